"""The local image store: blobs, unpacked layers and image metadata."""
