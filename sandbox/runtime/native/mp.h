/*
 * The subset of MessagePack the control channel uses: nil, booleans, integers, floats
 * (skipped), str, bin, arrays and maps. Reading never allocates and never reads past the
 * buffer: a value is a view into the message it was read from.
 */
#ifndef SBX_MP_H
#define SBX_MP_H

#include <stddef.h>
#include <stdint.h>

enum mp_type { MP_NIL, MP_BOOL, MP_INT, MP_FLOAT, MP_STR, MP_BIN, MP_ARRAY, MP_MAP, MP_EXT };

struct mp_value {
    enum mp_type type;
    int negative;          /* MP_INT: the value is `i` (< 0); else `u` */
    int64_t i;
    uint64_t u;            /* MP_INT when not negative; MP_BOOL: 0 or 1 */
    const uint8_t *data;   /* MP_STR, MP_BIN: the bytes; MP_ARRAY, MP_MAP: the first item */
    uint32_t len;          /* bytes, items or pairs */
    const uint8_t *end;    /* the end of the buffer the value was read from */
};

/* Read the value at *pos (before end) and move *pos past it, contents included.
 * Returns 0, or -1 for a truncated or malformed value, or one nested too deep. */
int mp_read(const uint8_t **pos, const uint8_t *end, struct mp_value *v);

/* A whole message: one value that fills the buffer exactly. */
int mp_parse(const uint8_t *buf, size_t len, struct mp_value *v);

/* The value of `key` in map `m`; 0 when found, -1 otherwise (or `m` is not a map). */
int mp_get(const struct mp_value *m, const char *key, struct mp_value *out);

/* Item `index` of an array; 0, or -1. */
int mp_item(const struct mp_value *a, uint32_t index, struct mp_value *out);

/* An integer that fits [lo, hi]: 0, or -1 (absent, another type, or out of range). */
int mp_int(const struct mp_value *v, int64_t lo, int64_t hi, int64_t *out);

/* A str or bin value. */
int mp_is_bytes(const struct mp_value *v);

struct mp_writer {
    uint8_t buf[16384];
    size_t len;
    int overflow;          /* something did not fit: the message must not be sent */
};

void mp_w_map(struct mp_writer *w, uint32_t pairs);
void mp_w_nil(struct mp_writer *w);
void mp_w_bool(struct mp_writer *w, int b);
void mp_w_int(struct mp_writer *w, int64_t i);
/* A str of valid UTF-8: invalid sequences of `s` become U+FFFD. */
void mp_w_str(struct mp_writer *w, const char *s, size_t len);
void mp_w_cstr(struct mp_writer *w, const char *s);

#endif
