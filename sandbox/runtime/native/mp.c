#include "mp.h"

#include <string.h>

#define MAX_DEPTH 16

static uint64_t be(const uint8_t *p, int n)
{
    uint64_t x = 0;
    int i;
    for (i = 0; i < n; i++)
        x = x << 8 | p[i];
    return x;
}

static int need(const uint8_t *p, const uint8_t *end, uint64_t n)
{
    return (uint64_t)(end - p) >= n ? 0 : -1;
}

static int read_at(const uint8_t **pos, const uint8_t *end, struct mp_value *v, int depth);

static int skip_items(const uint8_t **pos, const uint8_t *end, uint64_t n, int depth)
{
    struct mp_value item;
    uint64_t i;
    for (i = 0; i < n; i++)
        if (read_at(pos, end, &item, depth + 1) < 0)
            return -1;
    return 0;
}

static int sized(const uint8_t **pos, const uint8_t *end, struct mp_value *v, enum mp_type t,
                 int width)
{
    const uint8_t *p = *pos;
    uint64_t n;
    if (need(p, end, (uint64_t)width) < 0)
        return -1;
    n = be(p, width);
    p += width;
    if (need(p, end, n) < 0)
        return -1;
    v->type = t;
    v->data = p;
    v->len = (uint32_t)n;
    *pos = p + n;
    return 0;
}

static int container(const uint8_t **pos, const uint8_t *end, struct mp_value *v,
                     enum mp_type t, uint64_t n, int depth)
{
    if (depth >= MAX_DEPTH || n > (uint64_t)(end - *pos)) /* each item takes a byte at least */
        return -1;
    v->type = t;
    v->len = (uint32_t)n;
    v->data = *pos;
    return skip_items(pos, end, t == MP_MAP ? 2 * n : n, depth);
}

static int read_at(const uint8_t **pos, const uint8_t *end, struct mp_value *v, int depth)
{
    const uint8_t *p = *pos;
    uint8_t b;
    int w;

    memset(v, 0, sizeof(*v));
    v->end = end;
    if (need(p, end, 1) < 0)
        return -1;
    b = *p++;
    *pos = p;
    if (b <= 0x7f) {
        v->type = MP_INT;
        v->u = b;
        return 0;
    }
    if (b >= 0xe0) {
        v->type = MP_INT;
        v->negative = 1;
        v->i = (int8_t)b;
        return 0;
    }
    if ((b & 0xf0) == 0x80)
        return container(pos, end, v, MP_MAP, b & 0x0f, depth);
    if ((b & 0xf0) == 0x90)
        return container(pos, end, v, MP_ARRAY, b & 0x0f, depth);
    if ((b & 0xe0) == 0xa0) {
        if (need(p, end, b & 0x1f) < 0)
            return -1;
        v->type = MP_STR;
        v->data = p;
        v->len = b & 0x1f;
        *pos = p + v->len;
        return 0;
    }
    switch (b) {
    case 0xc0:
        v->type = MP_NIL;
        return 0;
    case 0xc2:
    case 0xc3:
        v->type = MP_BOOL;
        v->u = b == 0xc3;
        return 0;
    case 0xc4: case 0xc5: case 0xc6:
        return sized(pos, end, v, MP_BIN, 1 << (b - 0xc4));
    case 0xd9: case 0xda: case 0xdb:
        return sized(pos, end, v, MP_STR, 1 << (b - 0xd9));
    case 0xc7: case 0xc8: case 0xc9: /* ext: a type byte after the size */
        w = 1 << (b - 0xc7);
        if (need(p, end, (uint64_t)w + 1) < 0 || need(p + w + 1, end, be(p, w)) < 0)
            return -1;
        v->type = MP_EXT;
        *pos = p + w + 1 + be(p, w);
        return 0;
    case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8: /* fixext 1..16 */
        if (need(p, end, 1 + (1u << (b - 0xd4))) < 0)
            return -1;
        v->type = MP_EXT;
        *pos = p + 1 + (1u << (b - 0xd4));
        return 0;
    case 0xca: case 0xcb:
        if (need(p, end, b == 0xca ? 4 : 8) < 0)
            return -1;
        v->type = MP_FLOAT;
        *pos = p + (b == 0xca ? 4 : 8);
        return 0;
    case 0xcc: case 0xcd: case 0xce: case 0xcf:
        w = 1 << (b - 0xcc);
        if (need(p, end, (uint64_t)w) < 0)
            return -1;
        v->type = MP_INT;
        v->u = be(p, w);
        *pos = p + w;
        return 0;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3:
        w = 1 << (b - 0xd0);
        if (need(p, end, (uint64_t)w) < 0)
            return -1;
        v->type = MP_INT;
        {
            uint64_t raw = be(p, w);
            int shift = 64 - 8 * w;
            v->i = shift ? (int64_t)(raw << shift) >> shift : (int64_t)raw;
        }
        if (v->i >= 0) {
            v->u = (uint64_t)v->i;
        } else {
            v->negative = 1;
        }
        *pos = p + w;
        return 0;
    case 0xdc: case 0xdd:
        w = b == 0xdc ? 2 : 4;
        if (need(p, end, (uint64_t)w) < 0)
            return -1;
        *pos = p + w;
        return container(pos, end, v, MP_ARRAY, be(p, w), depth);
    case 0xde: case 0xdf:
        w = b == 0xde ? 2 : 4;
        if (need(p, end, (uint64_t)w) < 0)
            return -1;
        *pos = p + w;
        return container(pos, end, v, MP_MAP, be(p, w), depth);
    default: /* 0xc1: never used */
        return -1;
    }
}

int mp_read(const uint8_t **pos, const uint8_t *end, struct mp_value *v)
{
    return read_at(pos, end, v, 0);
}

int mp_parse(const uint8_t *buf, size_t len, struct mp_value *v)
{
    const uint8_t *p = buf;
    if (mp_read(&p, buf + len, v) < 0 || p != buf + len)
        return -1;
    return 0;
}

int mp_get(const struct mp_value *m, const char *key, struct mp_value *out)
{
    const uint8_t *p;
    struct mp_value k;
    size_t klen = strlen(key);
    uint32_t i;

    if (m->type != MP_MAP)
        return -1;
    p = m->data;
    for (i = 0; i < m->len; i++) {
        if (mp_read(&p, m->end, &k) < 0 || mp_read(&p, m->end, out) < 0)
            return -1;
        if (k.type == MP_STR && k.len == klen && memcmp(k.data, key, klen) == 0)
            return 0;
    }
    return -1;
}

int mp_item(const struct mp_value *a, uint32_t index, struct mp_value *out)
{
    const uint8_t *p;
    uint32_t i;
    if (a->type != MP_ARRAY || index >= a->len)
        return -1;
    p = a->data;
    for (i = 0; i <= index; i++)
        if (mp_read(&p, a->end, out) < 0)
            return -1;
    return 0;
}

int mp_int(const struct mp_value *v, int64_t lo, int64_t hi, int64_t *out)
{
    if (v->type != MP_INT)
        return -1;
    if (v->negative) {
        if (v->i < lo || v->i > hi)
            return -1;
        *out = v->i;
        return 0;
    }
    if (v->u > (uint64_t)INT64_MAX || (int64_t)v->u < lo || (int64_t)v->u > hi)
        return -1;
    *out = (int64_t)v->u;
    return 0;
}

int mp_is_bytes(const struct mp_value *v)
{
    return v->type == MP_STR || v->type == MP_BIN;
}

static void put(struct mp_writer *w, const void *data, size_t n)
{
    if (w->overflow || n > sizeof(w->buf) - w->len) {
        w->overflow = 1;
        return;
    }
    memcpy(w->buf + w->len, data, n);
    w->len += n;
}

static void put_be(struct mp_writer *w, uint8_t tag, uint64_t x, int width)
{
    uint8_t b[9];
    int i;
    b[0] = tag;
    for (i = 0; i < width; i++)
        b[1 + i] = (uint8_t)(x >> (8 * (width - 1 - i)));
    put(w, b, (size_t)width + 1);
}

void mp_w_map(struct mp_writer *w, uint32_t pairs)
{
    if (pairs < 16) {
        uint8_t b = (uint8_t)(0x80 | pairs);
        put(w, &b, 1);
    } else {
        put_be(w, 0xde, pairs, 2);
    }
}

void mp_w_nil(struct mp_writer *w)
{
    uint8_t b = 0xc0;
    put(w, &b, 1);
}

void mp_w_bool(struct mp_writer *w, int v)
{
    uint8_t b = v ? 0xc3 : 0xc2;
    put(w, &b, 1);
}

void mp_w_int(struct mp_writer *w, int64_t i)
{
    if (i >= 0 && i <= 0x7f) {
        uint8_t b = (uint8_t)i;
        put(w, &b, 1);
    } else if (i >= 0) {
        put_be(w, 0xcf, (uint64_t)i, 8);
    } else {
        put_be(w, 0xd3, (uint64_t)i, 8);
    }
}

/* Length of the valid UTF-8 sequence at s (at most n bytes), 0 if it is not one. */
static size_t utf8_seq(const uint8_t *s, size_t n)
{
    uint32_t c;
    size_t len, i;
    if (s[0] < 0x80)
        return 1;
    if (s[0] >= 0xc2 && s[0] <= 0xdf)
        len = 2, c = s[0] & 0x1f;
    else if (s[0] >= 0xe0 && s[0] <= 0xef)
        len = 3, c = s[0] & 0x0f;
    else if (s[0] >= 0xf0 && s[0] <= 0xf4)
        len = 4, c = s[0] & 0x07;
    else
        return 0;
    if (len > n)
        return 0;
    for (i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80)
            return 0;
        c = c << 6 | (s[i] & 0x3f);
    }
    if ((len == 3 && (c < 0x800 || (c >= 0xd800 && c <= 0xdfff))) ||
        (len == 4 && (c < 0x10000 || c > 0x10ffff)))
        return 0;
    return len;
}

void mp_w_str(struct mp_writer *w, const char *s, size_t len)
{
    static const uint8_t replacement[] = {0xef, 0xbf, 0xbd};
    const uint8_t *p = (const uint8_t *)s;
    size_t out = 0, i = 0, n;

    while (i < len) { /* the encoded length first */
        n = utf8_seq(p + i, len - i);
        out += n ? n : sizeof(replacement);
        i += n ? n : 1;
    }
    if (out < 32) {
        uint8_t b = (uint8_t)(0xa0 | out);
        put(w, &b, 1);
    } else {
        put_be(w, 0xdb, out, 4);
    }
    for (i = 0; i < len; i += n ? n : 1) {
        n = utf8_seq(p + i, len - i);
        if (n)
            put(w, p + i, n);
        else
            put(w, replacement, sizeof(replacement));
    }
}

void mp_w_cstr(struct mp_writer *w, const char *s)
{
    mp_w_str(w, s, strlen(s));
}
