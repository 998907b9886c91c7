/* The buffered OpenAI answer's logprobs, read and rewritten in place, without building the document.
 *
 * scan(data, chat) validates the whole body as JSON and finds, in each choice, the returned logprob
 * numbers and the texts of their tokens; splice(data, spans, segments) writes new numbers over those spans
 * and leaves every other byte as the engine sent it. The Python reader (logprobs.read / write over the
 * parsed document) is the reference: this module handles only the regular shapes (every position with the
 * same number of alternatives, no nulls, no duplicate names where they matter) and returns None for
 * anything else, which the caller then reads the slow way and refuses or accepts exactly as before. So
 * what this module accepts, the reference accepts too, with the same values, keys and counts
 * (tests/unit/server_plugins/test_lpscan.py holds the two side by side).
 *
 * Token keys are the reference's: the first 8 bytes (little-endian, top bit cleared) of BLAKE2b-64 over
 * the token's UTF-8 text (surrogatepass for a lone surrogate escape), or N for vLLM's "token_id:N".
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- BLAKE2b (RFC 7693), one 8-byte digest, no key ------------------------------------------- */
static const uint64_t B2_IV[8] = {
    0x6a09e667f3bcc908ULL, 0xbb67ae8584caa73bULL, 0x3c6ef372fe94f82bULL, 0xa54ff53a5f1d36f1ULL,
    0x510e527fade682d1ULL, 0x9b05688c2b3e6c1fULL, 0x1f83d9abfb41bd6bULL, 0x5be0cd19137e2179ULL};
static const uint8_t B2_SIGMA[12][16] = {
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3},
    {11, 8, 12, 0, 5, 2, 15, 13, 10, 14, 3, 6, 7, 1, 9, 4}, {7, 9, 3, 1, 13, 12, 11, 14, 2, 6, 5, 10, 4, 0, 15, 8},
    {9, 0, 5, 7, 2, 4, 10, 15, 14, 1, 11, 12, 6, 8, 3, 13}, {2, 12, 6, 10, 0, 11, 8, 3, 4, 13, 7, 5, 15, 14, 1, 9},
    {12, 5, 1, 15, 14, 13, 4, 10, 0, 7, 6, 3, 9, 2, 8, 11}, {13, 11, 7, 14, 12, 1, 3, 9, 5, 0, 15, 4, 8, 6, 2, 10},
    {6, 15, 14, 9, 11, 3, 0, 8, 12, 2, 13, 7, 1, 4, 10, 5}, {10, 2, 8, 4, 7, 6, 1, 5, 15, 11, 9, 14, 3, 12, 13, 0},
    {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15}, {14, 10, 4, 8, 9, 15, 13, 6, 1, 12, 0, 2, 11, 7, 5, 3}};

static inline uint64_t rotr64(uint64_t x, int n) { return (x >> n) | (x << (64 - n)); }

static inline uint64_t load64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}

#define B2_G(a, b, c, d, x, y)                  \
    do {                                        \
        v[a] = v[a] + v[b] + (x);               \
        v[d] = rotr64(v[d] ^ v[a], 32);         \
        v[c] = v[c] + v[d];                     \
        v[b] = rotr64(v[b] ^ v[c], 24);         \
        v[a] = v[a] + v[b] + (y);               \
        v[d] = rotr64(v[d] ^ v[a], 16);         \
        v[c] = v[c] + v[d];                     \
        v[b] = rotr64(v[b] ^ v[c], 63);         \
    } while (0)

static void b2_compress(uint64_t h[8], const uint8_t block[128], uint64_t t, int last) {
    uint64_t v[16], m[16];
    for (int i = 0; i < 16; i++) m[i] = load64(block + 8 * i);
    for (int i = 0; i < 8; i++) {
        v[i] = h[i];
        v[i + 8] = B2_IV[i];
    }
    v[12] ^= t; /* the byte counter's high word stays 0: inputs here are far below 2^64 bytes */
    if (last) v[14] = ~v[14];
    for (int r = 0; r < 12; r++) {
        const uint8_t *s = B2_SIGMA[r];
        B2_G(0, 4, 8, 12, m[s[0]], m[s[1]]);
        B2_G(1, 5, 9, 13, m[s[2]], m[s[3]]);
        B2_G(2, 6, 10, 14, m[s[4]], m[s[5]]);
        B2_G(3, 7, 11, 15, m[s[6]], m[s[7]]);
        B2_G(0, 5, 10, 15, m[s[8]], m[s[9]]);
        B2_G(1, 6, 11, 12, m[s[10]], m[s[11]]);
        B2_G(2, 7, 8, 13, m[s[12]], m[s[13]]);
        B2_G(3, 4, 9, 14, m[s[14]], m[s[15]]);
    }
    for (int i = 0; i < 8; i++) h[i] ^= v[i] ^ v[i + 8];
}

/* BLAKE2b with an 8-byte digest: the digest read as a little-endian integer is h[0] after the last block */
static uint64_t blake2b_64(const uint8_t *data, size_t n) {
    uint64_t h[8];
    uint8_t block[128];
    memcpy(h, B2_IV, sizeof h);
    h[0] ^= 0x01010000ULL ^ 8ULL; /* fanout 1, depth 1, no key, 8-byte digest */
    uint64_t t = 0;
    while (n > 128) {
        t += 128;
        b2_compress(h, data, t, 0);
        data += 128;
        n -= 128;
    }
    memset(block, 0, sizeof block);
    if (n) memcpy(block, data, n);
    b2_compress(h, block, t + n, 1);
    return h[0];
}

/* ---- the scanner ---------------------------------------------------------------------------- */
#define MAX_DEPTH 256   /* deeper documents go to the reference reader, which decides */
#define SHORT_TEXT 256  /* token texts up to this decode on the stack */

typedef struct {
    Py_ssize_t start, end;
} Span;

typedef struct {
    void *data;
    Py_ssize_t n, cap, size;
} Vec;

static int vec_push(Vec *v, const void *item) {
    if (v->n == v->cap) {
        Py_ssize_t cap = v->cap ? 2 * v->cap : 64;
        void *d = PyMem_Realloc(v->data, (size_t)(cap * v->size));
        if (d == NULL) return -1;
        v->data = d;
        v->cap = cap;
    }
    memcpy((char *)v->data + v->n * v->size, item, (size_t)v->size);
    v->n++;
    return 0;
}

static void vec_free(Vec *v) {
    PyMem_Free(v->data);
    v->data = NULL;
    v->n = v->cap = 0;
}

/* why a scan stopped: not handled here (the reference reader decides) or a Python error (memory) */
enum { OK = 0, DECLINE = 1, ERROR = 2 };

typedef struct {
    const uint8_t *s, *p, *end;
    int depth;
    /* per choice, the top alternatives and the sampled tokens: values, keys, spans */
    Vec top_v, top_k, top_s, smp_v, smp_k, smp_s;
    Vec spans; /* every choice's spans: its top ones, then its sampled ones */
} Scanner;

typedef struct {  /* a JSON string as it stands in the body: between the quotes */
    const uint8_t *raw;
    Py_ssize_t len;
    int escaped;
    Py_ssize_t chars; /* its length as a Python str */
} Str;

static inline void ws(Scanner *sc) {
    while (sc->p < sc->end && (*sc->p == ' ' || *sc->p == '\n' || *sc->p == '\r' || *sc->p == '\t')) sc->p++;
}

static inline int hexval(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static int hex4(const uint8_t *p, const uint8_t *end, unsigned *out) {
    if (end - p < 4) return -1;
    unsigned v = 0;
    for (int i = 0; i < 4; i++) {
        int h = hexval(p[i]);
        if (h < 0) return -1;
        v = (v << 4) | (unsigned)h;
    }
    *out = v;
    return 0;
}

/* one UTF-8 sequence at p (strict: no overlongs, no encoded surrogates, nothing above U+10FFFF); its
 * length, or 0 when it is not valid */
static int utf8_len(const uint8_t *p, const uint8_t *end) {
    uint8_t c = p[0];
    if (c < 0x80) return 1;
    if (c >= 0xC2 && c <= 0xDF) return (end - p >= 2 && (p[1] & 0xC0) == 0x80) ? 2 : 0;
    if (c >= 0xE0 && c <= 0xEF) {
        if (end - p < 3 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80) return 0;
        if (c == 0xE0 && p[1] < 0xA0) return 0;
        if (c == 0xED && p[1] >= 0xA0) return 0;
        return 3;
    }
    if (c >= 0xF0 && c <= 0xF4) {
        if (end - p < 4 || (p[1] & 0xC0) != 0x80 || (p[2] & 0xC0) != 0x80 || (p[3] & 0xC0) != 0x80) return 0;
        if (c == 0xF0 && p[1] < 0x90) return 0;
        if (c == 0xF4 && p[1] >= 0x90) return 0;
        return 4;
    }
    return 0;
}

/* a string at sc->p (which is at its opening quote): validated, its raw span and its length in chars */
static int string(Scanner *sc, Str *out) {
    const uint8_t *p = sc->p + 1, *end = sc->end;
    Py_ssize_t chars = 0;
    int escaped = 0;
    while (p < end) {
        uint8_t c = *p;
        if (c == '"') {
            out->raw = sc->p + 1;
            out->len = p - (sc->p + 1);
            out->escaped = escaped;
            out->chars = chars;
            sc->p = p + 1;
            return OK;
        }
        if (c < 0x20) return DECLINE;
        if (c == '\\') {
            escaped = 1;
            if (end - p < 2) return DECLINE;
            uint8_t e = p[1];
            if (e == 'u') {
                unsigned u, lo;
                if (hex4(p + 2, end, &u)) return DECLINE;
                p += 6;
                /* a high surrogate escape followed by a low one is one character, as the reference reads it */
                if (u >= 0xD800 && u <= 0xDBFF && end - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
                    hex4(p + 2, end, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF)
                    p += 6;
            } else if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' ||
                       e == 't') {
                p += 2;
            } else {
                return DECLINE;
            }
            chars++;
            continue;
        }
        int n = utf8_len(p, end);
        if (n == 0) return DECLINE;
        p += n;
        chars++;
    }
    return DECLINE;
}

static void put_utf8(uint8_t **q, unsigned cp) {  /* surrogates too: Python's "surrogatepass" */
    uint8_t *o = *q;
    if (cp < 0x80) {
        *o++ = (uint8_t)cp;
    } else if (cp < 0x800) {
        *o++ = (uint8_t)(0xC0 | (cp >> 6));
        *o++ = (uint8_t)(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
        *o++ = (uint8_t)(0xE0 | (cp >> 12));
        *o++ = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (uint8_t)(0x80 | (cp & 0x3F));
    } else {
        *o++ = (uint8_t)(0xF0 | (cp >> 18));
        *o++ = (uint8_t)(0x80 | ((cp >> 12) & 0x3F));
        *o++ = (uint8_t)(0x80 | ((cp >> 6) & 0x3F));
        *o++ = (uint8_t)(0x80 | (cp & 0x3F));
    }
    *q = o;
}

/* the text of a validated string, unescaped, as UTF-8 into out (room for s->len bytes: never longer) */
static Py_ssize_t unescape(const Str *s, uint8_t *out) {
    const uint8_t *p = s->raw, *end = s->raw + s->len;
    uint8_t *q = out;
    while (p < end) {
        if (*p != '\\') {
            *q++ = *p++;
            continue;
        }
        uint8_t e = p[1];
        if (e == 'u') {
            unsigned u, lo;
            hex4(p + 2, end, &u);
            p += 6;
            if (u >= 0xD800 && u <= 0xDBFF && end - p >= 6 && p[0] == '\\' && p[1] == 'u' &&
                hex4(p + 2, end, &lo) == 0 && lo >= 0xDC00 && lo <= 0xDFFF) {
                u = 0x10000 + ((u - 0xD800) << 10) + (lo - 0xDC00);
                p += 6;
            }
            put_utf8(&q, u);
        } else {
            static const char from[] = "\"\\/bfnrt", to[] = "\"\\/\b\f\n\r\t";
            *q++ = (uint8_t)to[strchr(from, e) - from];
            p += 2;
        }
    }
    return q - out;
}

/* Token keys by the token's bytes as the body spells them: a direct-mapped cache (a vocabulary's common tokens
 * stay; a colliding one replaces the slot). BLAKE2b costs about 0.3 us a token, a hit a tenth of that. */
#define CACHE_SLOTS (1u << 16)
#define CACHE_TEXT 46
typedef struct {
    uint64_t tag;
    int64_t key;
    uint8_t len;
    uint8_t text[CACHE_TEXT + 1];
} Slot; /* 64 bytes: one cache line */
static Slot *cache;

static inline uint64_t fnv1a(const uint8_t *p, Py_ssize_t n) {
    uint64_t h = 0xcbf29ce484222325ULL;
    for (Py_ssize_t i = 0; i < n; i++) h = (h ^ p[i]) * 0x100000001b3ULL;
    return h | 1; /* 0 marks an empty slot */
}

static int token_key_uncached(const Str *s, int64_t *key);

/* the key of a token's text (logprobs.token_key) */
static int token_key(const Str *s, int64_t *key) {
    if (s->len > CACHE_TEXT) return token_key_uncached(s, key);
    if (cache == NULL && (cache = PyMem_Calloc(CACHE_SLOTS, sizeof(Slot))) == NULL) {
        PyErr_NoMemory();
        return ERROR;
    }
    /* escaped and plain spellings hash apart: the same bytes mean other texts in the two */
    uint64_t tag = fnv1a(s->raw, s->len) ^ (s->escaped ? 0x9e3779b97f4a7c15ULL : 0);
    Slot *slot = &cache[tag & (CACHE_SLOTS - 1)];
    if (slot->tag == tag && slot->len == s->len && memcmp(slot->text, s->raw, (size_t)s->len) == 0) {
        *key = slot->key;
        return OK;
    }
    int rc = token_key_uncached(s, key);
    if (rc == OK) {
        slot->tag = tag;
        slot->key = *key;
        slot->len = (uint8_t)s->len;
        memcpy(slot->text, s->raw, (size_t)s->len);
    }
    return rc;
}

static int token_key_uncached(const Str *s, int64_t *key) {
    uint8_t stack[SHORT_TEXT], *buf = stack;
    const uint8_t *t = s->raw;
    Py_ssize_t n = s->len;
    if (s->escaped) {
        if (n > SHORT_TEXT) {
            buf = PyMem_Malloc((size_t)n);
            if (buf == NULL) {
                PyErr_NoMemory();
                return ERROR;
            }
        }
        n = unescape(s, buf);
        t = buf;
    }
    int rc = OK;
    if (n > 9 && n - 9 <= 18 && memcmp(t, "token_id:", 9) == 0) {
        /* the id itself when the rest is 1 to 18 ASCII digits (fits an int64) */
        int64_t v = 0;
        Py_ssize_t i = 9;
        while (i < n && t[i] >= '0' && t[i] <= '9') v = v * 10 + (t[i++] - '0');
        if (i == n) {
            *key = v;
            goto done;
        }
    }
    *key = (int64_t)(blake2b_64(t, (size_t)n) & 0x7FFFFFFFFFFFFFFFULL);
done:
    if (buf != stack) PyMem_Free(buf);
    return rc;
}

/* a number at sc->p: validated; *isint when it has no fraction or exponent */
static int number(Scanner *sc, Span *span, int *isint) {
    const uint8_t *p = sc->p, *end = sc->end;
    *isint = 1;
    if (p < end && *p == '-') p++;
    if (p >= end) return DECLINE;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        while (p < end && *p >= '0' && *p <= '9') p++;
    } else {
        return DECLINE;
    }
    if (p < end && *p == '.') {
        *isint = 0;
        p++;
        if (p >= end || *p < '0' || *p > '9') return DECLINE;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        *isint = 0;
        p++;
        if (p < end && (*p == '+' || *p == '-')) p++;
        if (p >= end || *p < '0' || *p > '9') return DECLINE;
        while (p < end && *p >= '0' && *p <= '9') p++;
    }
    span->start = sc->p - sc->s;
    span->end = p - sc->s;
    sc->p = p;
    return OK;
}

/* A validated JSON number's double, correctly rounded as float() reads it, without float()'s cost (about
 * 0.2 us a number, most of a scan): up to 19 significant digits and a decimal exponent within 10^+-27, the
 * digits are an exact integer and the power of ten exact in x87 extended precision, so one extended
 * multiply or divide lands within half an extended ulp of the true value; rounding that to double is
 * then the correct rounding unless it sits next to a double midpoint (the 11 bits dropped at 0x3FF-0x401),
 * and those few go to PyOS_string_to_double, as does anything longer or without a 64-bit extended type.
 * Returns 1 with *out set, 0 to take the slow path. */
static const long double POW10L[28] = {
    1e0L, 1e1L, 1e2L, 1e3L, 1e4L, 1e5L, 1e6L, 1e7L, 1e8L, 1e9L, 1e10L, 1e11L, 1e12L, 1e13L,
    1e14L, 1e15L, 1e16L, 1e17L, 1e18L, 1e19L, 1e20L, 1e21L, 1e22L, 1e23L, 1e24L, 1e25L, 1e26L, 1e27L};

static int quick_double(const uint8_t *p, const uint8_t *end, double *out) {
#if LDBL_MANT_DIG == 64
    int neg = 0, digits = 0, exp10 = 0;
    uint64_t m = 0;
    if (*p == '-') {
        neg = 1;
        p++;
    }
    for (; p < end && *p >= '0' && *p <= '9'; p++) {
        if (m == 0 && *p == '0') continue; /* leading zeros are not significant */
        if (++digits > 19) return 0;
        m = m * 10 + (uint64_t)(*p - '0');
    }
    if (p < end && *p == '.') {
        for (p++; p < end && *p >= '0' && *p <= '9'; p++) {
            exp10--;
            if (m == 0 && *p == '0') continue;
            if (++digits > 19) return 0;
            m = m * 10 + (uint64_t)(*p - '0');
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        int eneg = 0, e = 0;
        p++;
        if (*p == '+' || *p == '-') eneg = *p++ == '-';
        for (; p < end && *p >= '0' && *p <= '9'; p++) {
            if (e > 1000) return 0;
            e = e * 10 + (*p - '0');
        }
        exp10 += eneg ? -e : e;
    }
    if (m == 0) {
        *out = neg ? -0.0 : 0.0;
        return 1;
    }
    if (exp10 < -27 || exp10 > 27) return 0;
    long double r = (long double)m;
    r = exp10 < 0 ? r / POW10L[-exp10] : r * POW10L[exp10];
    uint64_t bits;
#if defined(__x86_64__) || defined(__i386__)
    /* x87 extended: the 64-bit significand (explicit integer bit) is the first 8 bytes; r is normal here */
    memcpy(&bits, &r, sizeof bits);
#else
    int e2;
    bits = (uint64_t)ldexpl(frexpl(r, &e2), 64);
#endif
    unsigned low = (unsigned)(bits & 0x7FF);
    if (low >= 0x3FF && low <= 0x401) return 0;
    double d = (double)r;
    *out = neg ? -d : d;
    return 1;
#else
    (void)p;
    (void)end;
    (void)out;
    return 0;
#endif
}

/* a logprob: a number that reads as a finite double (as the reference's float32 takes it) */
static int logprob(Scanner *sc, float *value, Span *span) {
    int isint;
    if (sc->p >= sc->end || !(*sc->p == '-' || (*sc->p >= '0' && *sc->p <= '9'))) return DECLINE;
    int rc = number(sc, span, &isint);
    if (rc) return rc;
    Py_ssize_t n = span->end - span->start;
    if (n > 40 || (isint && n > 15)) return DECLINE; /* long ints and odd spellings: the reference decides */
    double q;
    if (quick_double(sc->s + span->start, sc->s + span->end, &q)) {
        *value = (float)q;
        return OK;
    }
    char buf[48];
    memcpy(buf, sc->s + span->start, (size_t)n);
    buf[n] = 0;
    double d = PyOS_string_to_double(buf, NULL, NULL);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Clear();
        return DECLINE;
    }
    if (!isfinite(d)) return DECLINE;
    *value = (float)d;
    return OK;
}

static int skip_value(Scanner *sc);

static int literal(Scanner *sc, const char *word, size_t n) {
    if ((size_t)(sc->end - sc->p) < n || memcmp(sc->p, word, n) != 0) return DECLINE;
    sc->p += n;
    return OK;
}

/* the next item of an object or an array: call first with *started = 0; OK with the item next, or with
 * *done set at the closing bracket; DECLINE on bad JSON */
static int next_item(Scanner *sc, int *started, int *done, uint8_t open, uint8_t close) {
    ws(sc);
    if (sc->p >= sc->end) return DECLINE;
    if (!*started) {
        if (*sc->p != open) return DECLINE;
        *started = 1;
        sc->p++;
        ws(sc);
        if (sc->p < sc->end && *sc->p == close) {
            sc->p++;
            *done = 1;
        }
        return OK;
    }
    if (*sc->p == close) {
        sc->p++;
        *done = 1;
        return OK;
    }
    if (*sc->p != ',') return DECLINE;
    sc->p++;
    ws(sc);
    return OK;
}

/* an object's next member: its name, with the value next */
static int member(Scanner *sc, int *started, int *done, Str *name) {
    int rc = next_item(sc, started, done, '{', '}');
    if (rc || *done) return rc;
    if (sc->p >= sc->end || *sc->p != '"') return DECLINE;
    if ((rc = string(sc, name))) return rc;
    ws(sc);
    if (sc->p >= sc->end || *sc->p != ':') return DECLINE;
    sc->p++;
    ws(sc);
    return OK;
}

/* an array's next element */
static int element(Scanner *sc, int *started, int *done) { return next_item(sc, started, done, '[', ']'); }

static inline int is(const Str *name, const char *lit) {
    size_t n = strlen(lit);
    return !name->escaped && (size_t)name->len == n && memcmp(name->raw, lit, n) == 0;
}

/* a name this reader acts on, spelled with escapes, could mean one it acts on: left to the reference */
#define NAMED(name) ((name).escaped ? DECLINE : OK)

static int skip_value(Scanner *sc) {
    ws(sc);
    if (sc->p >= sc->end) return DECLINE;
    uint8_t c = *sc->p;
    int rc, started = 0, done = 0;
    if (c == '{' || c == '[') {
        if (++sc->depth > MAX_DEPTH) return DECLINE;
        while (1) {
            if (c == '{') {
                Str name;
                rc = member(sc, &started, &done, &name);
            } else {
                rc = element(sc, &started, &done);
            }
            if (rc) return rc;
            if (done) break;
            if ((rc = skip_value(sc))) return rc;
        }
        sc->depth--;
        return OK;
    }
    if (c == '"') {
        Str s;
        return string(sc, &s);
    }
    if (c == 't') return literal(sc, "true", 4);
    if (c == 'f') return literal(sc, "false", 5);
    if (c == 'n') return literal(sc, "null", 4);
    Span span;
    int isint;
    return number(sc, &span, &isint);
}

static inline int is_null(Scanner *sc) {
    ws(sc);
    return sc->end - sc->p >= 4 && memcmp(sc->p, "null", 4) == 0;
}

/* a string value; DECLINE when the value is something else */
static int string_value(Scanner *sc, Str *s) {
    ws(sc);
    if (sc->p >= sc->end || *sc->p != '"') return DECLINE;
    return string(sc, s);
}

static int push_token(Vec *values, Vec *keys, Vec *spans, float v, const Str *text, Span sp) {
    int64_t key;
    int rc = token_key(text, &key);
    if (rc) return rc;
    if (vec_push(values, &v) || vec_push(keys, &key) || vec_push(spans, &sp)) {
        PyErr_NoMemory();
        return ERROR;
    }
    return OK;
}

/* the alternatives of one position must have distinct keys (else the reference renames or merges them) */
static int distinct(const Vec *keys, Py_ssize_t from) {
    const int64_t *k = keys->data;
    for (Py_ssize_t i = from; i < keys->n; i++)
        for (Py_ssize_t j = from; j < i; j++)
            if (k[i] == k[j]) return DECLINE;
    return OK;
}

/* a member this reader does not act on: a known one (or a null) is skipped; any other is left to the
 * reference, which refuses an answer with a field it does not read rather than pass its values on */
static int other_member(Scanner *sc, const Str *name, const char *const *known) {
    for (; *known; known++)
        if (is(name, *known)) return skip_value(sc);
    if (is_null(sc)) {
        sc->p += 4;
        return OK;
    }
    return DECLINE;
}

static const char *const COMPLETION_OTHER[] = {"text_offset", NULL};
static const char *const CHAT_OTHER[] = {NULL};
static const char *const CHAT_TOKEN_OTHER[] = {"bytes", NULL};

/* completions: {tokens: [str], token_logprobs: [num], top_logprobs: [{str: num}], ...} */
static int completion_logprobs(Scanner *sc, Py_ssize_t *p_out, Py_ssize_t *k_out) {
    int started = 0, done = 0, rc;
    int seen_tokens = 0, seen_lps = 0, seen_tops = 0;
    Py_ssize_t n_tokens = 0, n_lps = 0, n_tops = 0, k = -1;
    Str name;
    /* token_logprobs may come before or after tokens: kept apart until both are read */
    Vec lps_v = {NULL, 0, 0, sizeof(float)}, lps_s = {NULL, 0, 0, sizeof(Span)};
    Vec tok_k = {NULL, 0, 0, sizeof(int64_t)};
    while (1) {
        if ((rc = member(sc, &started, &done, &name))) goto out;
        if (done) break;
        if ((rc = NAMED(name))) goto out;
        if (is(&name, "tokens")) {
            if (seen_tokens++) { rc = DECLINE; goto out; }
            int s2 = 0, d2 = 0;
            while (1) {
                if ((rc = element(sc, &s2, &d2))) goto out;
                if (d2) break;
                Str t;
                int64_t key;
                if ((rc = string_value(sc, &t)) || (rc = token_key(&t, &key))) goto out;
                if (vec_push(&tok_k, &key)) { PyErr_NoMemory(); rc = ERROR; goto out; }
                n_tokens++;
            }
        } else if (is(&name, "token_logprobs")) {
            if (seen_lps++) { rc = DECLINE; goto out; }
            int s2 = 0, d2 = 0;
            while (1) {
                if ((rc = element(sc, &s2, &d2))) goto out;
                if (d2) break;
                float v;
                Span sp;
                ws(sc);
                if ((rc = logprob(sc, &v, &sp))) goto out;
                if (vec_push(&lps_v, &v) || vec_push(&lps_s, &sp)) { PyErr_NoMemory(); rc = ERROR; goto out; }
                n_lps++;
            }
        } else if (is(&name, "top_logprobs")) {
            if (seen_tops++) { rc = DECLINE; goto out; }
            int s2 = 0, d2 = 0;
            while (1) {
                if ((rc = element(sc, &s2, &d2))) goto out;
                if (d2) break;
                int s3 = 0, d3 = 0;
                Py_ssize_t kk = 0, from = sc->top_k.n;
                if (++sc->depth > MAX_DEPTH) { rc = DECLINE; goto out; }
                while (1) {
                    Str t;
                    if ((rc = member(sc, &s3, &d3, &t))) goto out;
                    if (d3) break;
                    float v;
                    Span sp;
                    if ((rc = logprob(sc, &v, &sp)) ||
                        (rc = push_token(&sc->top_v, &sc->top_k, &sc->top_s, v, &t, sp)))
                        goto out;
                    kk++;
                }
                sc->depth--;
                if (kk == 0 || (k >= 0 && kk != k) || (rc = distinct(&sc->top_k, from))) {
                    rc = DECLINE;
                    goto out;
                }
                k = kk;
                n_tops++;
            }
        } else if ((rc = other_member(sc, &name, COMPLETION_OTHER))) {
            goto out;
        }
    }
    /* the regular shape only: one sampled token, its value and k alternatives at every position */
    if (n_tokens != n_tops || n_lps != n_tops) { rc = DECLINE; goto out; }
    for (Py_ssize_t i = 0; i < n_tops; i++) {
        if (vec_push(&sc->smp_v, (float *)lps_v.data + i) || vec_push(&sc->smp_k, (int64_t *)tok_k.data + i) ||
            vec_push(&sc->smp_s, (Span *)lps_s.data + i)) {
            PyErr_NoMemory();
            rc = ERROR;
            goto out;
        }
    }
    *p_out = n_tops;
    *k_out = n_tops ? k : 0;
out:
    vec_free(&lps_v);
    vec_free(&lps_s);
    vec_free(&tok_k);
    return rc;
}

/* one chat logprob object, {token, logprob, bytes, ...}: its token and value. An entry of content (n_alts
 * given) also carries top_logprobs, whose alternatives are pushed as they come and counted in *n_alts. */
static int chat_token(Scanner *sc, Str *t, float *v, Span *sp, Py_ssize_t *n_alts) {
    int started = 0, done = 0, rc, has_token = 0, has_lp = 0, has_tops = 0;
    Str name;
    if (++sc->depth > MAX_DEPTH) return DECLINE;
    while (1) {
        if ((rc = member(sc, &started, &done, &name))) return rc;
        if (done) break;
        if ((rc = NAMED(name))) return rc;
        if (is(&name, "token")) {
            if (has_token++) return DECLINE;
            if ((rc = string_value(sc, t))) return rc;
        } else if (is(&name, "logprob")) {
            if (has_lp++) return DECLINE;
            ws(sc);
            if ((rc = logprob(sc, v, sp))) return rc;
        } else if (n_alts != NULL && is(&name, "top_logprobs")) {
            if (has_tops++) return DECLINE;
            int s2 = 0, d2 = 0;
            if (++sc->depth > MAX_DEPTH) return DECLINE;
            while (1) {
                if ((rc = element(sc, &s2, &d2))) return rc;
                if (d2) break;
                Str at;
                float av = 0;
                Span asp = {0, 0};
                if ((rc = chat_token(sc, &at, &av, &asp, NULL)) ||
                    (rc = push_token(&sc->top_v, &sc->top_k, &sc->top_s, av, &at, asp)))
                    return rc;
                (*n_alts)++;
            }
            sc->depth--;
        } else if ((rc = other_member(sc, &name, CHAT_TOKEN_OTHER))) {
            return rc;
        }
    }
    sc->depth--;
    return has_token && has_lp ? OK : DECLINE;
}

/* chat: {content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}], refusal: null} */
static int chat_logprobs(Scanner *sc, Py_ssize_t *p_out, Py_ssize_t *k_out) {
    int started = 0, done = 0, rc, seen_content = 0, seen_refusal = 0;
    Py_ssize_t p = 0, k = -1;
    Str name;
    while (1) {
        if ((rc = member(sc, &started, &done, &name))) return rc;
        if (done) break;
        if ((rc = NAMED(name))) return rc;
        if (is(&name, "refusal")) {  /* the reference drops a refusal; only null passes here */
            if (seen_refusal++ || !is_null(sc)) return DECLINE;
            sc->p += 4;
        } else if (is(&name, "content")) {
            if (seen_content++) return DECLINE;
            if (is_null(sc)) {
                sc->p += 4;
                continue;
            }
            int s2 = 0, d2 = 0;
            if (++sc->depth > MAX_DEPTH) return DECLINE;
            while (1) {
                if ((rc = element(sc, &s2, &d2))) return rc;
                if (d2) break;
                Str t;
                float v = 0;
                Span sp = {0, 0};
                Py_ssize_t kk = 0, from = sc->top_k.n;
                if ((rc = chat_token(sc, &t, &v, &sp, &kk))) return rc;
                if (kk == 0 || (k >= 0 && kk != k) || distinct(&sc->top_k, from)) return DECLINE;
                k = kk;
                if ((rc = push_token(&sc->smp_v, &sc->smp_k, &sc->smp_s, v, &t, sp))) return rc;
                p++;
            }
            sc->depth--;
        } else if ((rc = other_member(sc, &name, CHAT_OTHER))) {
            return rc;
        }
    }
    *p_out = p;
    *k_out = p ? k : 0;
    return OK;
}

/* the characters of text the reference counts for a choice (completions: text; chat: message.content) */
static int message_text(Scanner *sc, Py_ssize_t *chars) {
    ws(sc);
    if (sc->p >= sc->end || *sc->p != '{') return skip_value(sc); /* not an object: the reference counts none */
    int started = 0, done = 0, rc, seen = 0;
    Str name;
    if (++sc->depth > MAX_DEPTH) return DECLINE;
    while (1) {
        if ((rc = member(sc, &started, &done, &name))) return rc;
        if (done) break;
        if ((rc = NAMED(name))) return rc;
        if (is(&name, "content")) {
            if (seen++) return DECLINE;
            ws(sc);
            if (sc->p < sc->end && *sc->p == '"') {
                Str s;
                if ((rc = string(sc, &s))) return rc;
                *chars = s.chars;
                continue;
            }
        }
        if ((rc = skip_value(sc))) return rc;
    }
    sc->depth--;
    return OK;
}

/* one choice: appends its tuple (p, k, floats, keys, chars) to out */
static int choice(Scanner *sc, int chat, PyObject *out) {
    int started = 0, done = 0, rc, seen_lp = 0, seen_text = 0;
    Py_ssize_t p = 0, k = 0, chars = 0;
    Str name;
    sc->top_v.n = sc->top_k.n = sc->top_s.n = sc->smp_v.n = sc->smp_k.n = sc->smp_s.n = 0;
    ws(sc);
    if (sc->p >= sc->end || *sc->p != '{') return DECLINE; /* the reference refuses a choice that is not an object */
    if (++sc->depth > MAX_DEPTH) return DECLINE;
    while (1) {
        if ((rc = member(sc, &started, &done, &name))) return rc;
        if (done) break;
        if ((rc = NAMED(name))) return rc;
        if (is(&name, "logprobs")) {
            if (seen_lp++) return DECLINE;
            if (is_null(sc)) {
                sc->p += 4;
                continue;
            }
            ws(sc);
            if (sc->p >= sc->end || *sc->p != '{') return DECLINE;
            if (++sc->depth > MAX_DEPTH) return DECLINE;
            rc = chat ? chat_logprobs(sc, &p, &k) : completion_logprobs(sc, &p, &k);
            if (rc) return rc;
            sc->depth--;
        } else if (chat && is(&name, "delta")) {
            return DECLINE; /* a streamed chunk's shape in a buffered body */
        } else if (chat ? is(&name, "message") : is(&name, "text")) {
            if (seen_text++) return DECLINE;
            if (chat) {
                if ((rc = message_text(sc, &chars))) return rc;
            } else {
                ws(sc);
                if (sc->p < sc->end && *sc->p == '"') {
                    Str s;
                    if ((rc = string(sc, &s))) return rc;
                    chars = s.chars;
                } else if ((rc = skip_value(sc))) {
                    return rc;
                }
            }
        } else if ((rc = skip_value(sc))) {
            return rc;
        }
    }
    sc->depth--;
    if (p && (sc->top_v.n != p * k || sc->smp_v.n != p)) return DECLINE;
    PyObject *floats = Py_None, *keys = Py_None;
    Py_INCREF(Py_None);
    Py_INCREF(Py_None);
    if (p) {
        /* [p x k] alternatives then [p] sampled: float32 values and int64 keys, as logprobs._pack lays them */
        Py_ssize_t n = p * k;
        Py_DECREF(floats);
        Py_DECREF(keys);
        floats = PyByteArray_FromStringAndSize(NULL, (n + p) * (Py_ssize_t)sizeof(float));
        keys = PyByteArray_FromStringAndSize(NULL, (n + p) * (Py_ssize_t)sizeof(int64_t));
        if (floats == NULL || keys == NULL) {
            Py_XDECREF(floats);
            Py_XDECREF(keys);
            return ERROR;
        }
        char *f = PyByteArray_AS_STRING(floats), *kb = PyByteArray_AS_STRING(keys);
        memcpy(f, sc->top_v.data, (size_t)n * sizeof(float));
        memcpy(f + n * sizeof(float), sc->smp_v.data, (size_t)p * sizeof(float));
        memcpy(kb, sc->top_k.data, (size_t)n * sizeof(int64_t));
        memcpy(kb + n * sizeof(int64_t), sc->smp_k.data, (size_t)p * sizeof(int64_t));
        for (Py_ssize_t i = 0; i < n; i++)
            if (vec_push(&sc->spans, (Span *)sc->top_s.data + i)) goto nomem;
        for (Py_ssize_t i = 0; i < p; i++)
            if (vec_push(&sc->spans, (Span *)sc->smp_s.data + i)) goto nomem;
    }
    PyObject *t = Py_BuildValue("(nnNNn)", p, k, floats, keys, chars);
    if (t == NULL) return ERROR;
    rc = PyList_Append(out, t);
    Py_DECREF(t);
    return rc ? ERROR : OK;
nomem:
    Py_DECREF(floats);
    Py_DECREF(keys);
    PyErr_NoMemory();
    return ERROR;
}

/* usage: the members whose values are JSON integers (the reference keeps ints, not bools or floats) */
static int usage(Scanner *sc, PyObject *dict) {
    ws(sc);
    if (sc->p >= sc->end || *sc->p != '{') return skip_value(sc); /* not an object: no usage */
    int started = 0, done = 0, rc;
    Str name;
    if (++sc->depth > MAX_DEPTH) return DECLINE;
    while (1) {
        if ((rc = member(sc, &started, &done, &name))) return rc;
        if (done) break;
        if ((rc = NAMED(name))) return rc;
        ws(sc);
        PyObject *key = PyUnicode_DecodeUTF8((const char *)name.raw, name.len, "strict");
        if (key == NULL) return ERROR;
        PyObject *val = NULL;
        if (sc->p < sc->end && (*sc->p == '-' || (*sc->p >= '0' && *sc->p <= '9'))) {
            Span sp;
            int isint;
            if ((rc = number(sc, &sp, &isint))) {
                Py_DECREF(key);
                return rc;
            }
            if (isint) {
                if (sp.end - sp.start > 18) {
                    Py_DECREF(key);
                    return DECLINE;
                }
                long long v = 0;
                const uint8_t *d = sc->s + sp.start;
                int neg = *d == '-';
                for (const uint8_t *q = d + neg; q < sc->s + sp.end; q++) v = v * 10 + (*q - '0');
                val = PyLong_FromLongLong(neg ? -v : v);
                if (val == NULL) {
                    Py_DECREF(key);
                    return ERROR;
                }
            }
        } else if ((rc = skip_value(sc))) {
            Py_DECREF(key);
            return rc;
        }
        /* a repeated name keeps its last value, as the reference's dict does */
        rc = val ? PyDict_SetItem(dict, key, val) : (PyDict_DelItem(dict, key) && (PyErr_Clear(), 0));
        Py_DECREF(key);
        Py_XDECREF(val);
        if (rc) return ERROR;
    }
    sc->depth--;
    return OK;
}

static int document(Scanner *sc, int chat, PyObject *choices, PyObject *usage_dict) {
    int started = 0, done = 0, rc, seen_choices = 0, seen_usage = 0;
    Str name;
    ws(sc);
    if (sc->p >= sc->end || *sc->p != '{') return DECLINE;
    sc->depth = 1;
    while (1) {
        if ((rc = member(sc, &started, &done, &name))) return rc;
        if (done) break;
        if ((rc = NAMED(name))) return rc;
        if (is(&name, "choices")) {
            if (seen_choices++) return DECLINE;
            if (is_null(sc)) {
                sc->p += 4;
                continue;
            }
            int s2 = 0, d2 = 0;
            if (++sc->depth > MAX_DEPTH) return DECLINE;
            while (1) {
                if ((rc = element(sc, &s2, &d2))) return rc;
                if (d2) break;
                if ((rc = choice(sc, chat, choices))) return rc;
            }
            sc->depth--;
        } else if (is(&name, "usage")) {
            if (seen_usage++) return DECLINE;
            if ((rc = usage(sc, usage_dict))) return rc;
        } else if ((rc = skip_value(sc))) {
            return rc;
        }
    }
    ws(sc);
    return sc->p == sc->end ? OK : DECLINE;
}

static PyObject *scan(PyObject *self, PyObject *args) {
    Py_buffer buf;
    int chat;
    if (!PyArg_ParseTuple(args, "y*p:scan", &buf, &chat)) return NULL;
    Scanner sc;
    memset(&sc, 0, sizeof sc);
    sc.s = sc.p = buf.buf;
    sc.end = sc.s + buf.len;
    sc.top_v.size = sc.smp_v.size = sizeof(float);
    sc.top_k.size = sc.smp_k.size = sizeof(int64_t);
    sc.top_s.size = sc.smp_s.size = sc.spans.size = sizeof(Span);
    PyObject *choices = PyList_New(0), *usage_dict = PyDict_New(), *result = NULL;
    if (choices == NULL || usage_dict == NULL) goto out;
    int rc = document(&sc, chat, choices, usage_dict);
    if (rc == ERROR) goto out;
    if (rc == DECLINE) {
        result = Py_None;
        Py_INCREF(result);
        goto out;
    }
    PyObject *spans = PyBytes_FromStringAndSize(sc.spans.data, sc.spans.n * (Py_ssize_t)sizeof(Span));
    if (spans == NULL) goto out;
    result = Py_BuildValue("(OON)", choices, usage_dict, spans);
out:
    Py_XDECREF(choices);
    Py_XDECREF(usage_dict);
    vec_free(&sc.top_v);
    vec_free(&sc.top_k);
    vec_free(&sc.top_s);
    vec_free(&sc.smp_v);
    vec_free(&sc.smp_k);
    vec_free(&sc.smp_s);
    vec_free(&sc.spans);
    PyBuffer_Release(&buf);
    return result;
}

/* ---- the writer ----------------------------------------------------------------------------- */
typedef struct {
    Span span;
    double value;
} Edit;

/* The edits in document order. They come as a few runs already in order (each segment's spans are; a
 * completion's sampled values come before its alternatives in the document), so a natural merge sort
 * (merge neighbouring runs until one is left) does it in a pass or two, where qsort's comparator calls cost
 * more than writing the numbers. Returns the sorted array (*edits or a new one, the other freed), NULL on
 * no memory. */
static Edit *in_order(Edit *edits, Py_ssize_t n) {
    Py_ssize_t i = 1;
    while (i < n && edits[i - 1].span.start <= edits[i].span.start) i++;
    if (i >= n) return edits;
    Edit *a = edits, *b = PyMem_Malloc((size_t)n * sizeof(Edit));
    if (b == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    for (;;) {
        Py_ssize_t runs = 0, lo = 0;
        while (lo < n) { /* merge the run at lo with the next one into b */
            Py_ssize_t mid = lo + 1;
            while (mid < n && a[mid - 1].span.start <= a[mid].span.start) mid++;
            Py_ssize_t hi = mid;
            if (hi < n) {
                hi++;
                while (hi < n && a[hi - 1].span.start <= a[hi].span.start) hi++;
            }
            Py_ssize_t x = lo, y = mid, k = lo;
            while (x < mid && y < hi) b[k++] = a[y].span.start < a[x].span.start ? a[y++] : a[x++];
            while (x < mid) b[k++] = a[x++];
            while (y < hi) b[k++] = a[y++];
            runs++;
            lo = hi;
        }
        Edit *t = a;
        a = b;
        b = t;
        if (runs == 1) break;
    }
    PyMem_Free(b); /* the other buffer: the caller's edits or the scratch one */
    return a;
}

/* one protected value as logprobs._json_floats and the encoder write it: NaN and +inf as null (no JSON
 * number), below -9999 (-inf) as -9999.0, else rounded to 7 decimals. The rounded value is the double
 * nearest N / 10^7 for the integer N, so N's decimal digits read back as exactly that double, as its repr
 * does; written here without a float-to-string conversion. At most 32 characters. */
static Py_ssize_t write_number(char *out, double x) {
    if (isnan(x) || x == HUGE_VAL) {
        memcpy(out, "null", 4);
        return 4;
    }
    if (x < -9999.0) x = -9999.0;
    double scaled = rint(x * 1e7); /* numpy's round(7): scale, round half to even, scale back */
    x = scaled / 1e7;
    if (fabs(scaled) >= 9007199254740992.0) { /* beyond 2^53: the repr, like the encoder's */
        char *s = PyOS_double_to_string(x, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
        if (s == NULL) return 0;
        size_t len = strlen(s);
        if (!isfinite(x) || len > 32) {
            memcpy(out, "null", 4);
            len = 4;
        } else {
            memcpy(out, s, len);
        }
        PyMem_Free(s);
        return (Py_ssize_t)len;
    }
    char *o = out;
    if (signbit(x)) *o++ = '-';
    uint64_t n = (uint64_t)fabs(scaled), whole = n / 10000000u, frac = n % 10000000u;
    char digits[24];
    int nd = 0;
    do {
        digits[nd++] = (char)('0' + whole % 10);
        whole /= 10;
    } while (whole);
    while (nd) *o++ = digits[--nd];
    *o++ = '.';
    char f[7];
    for (int i = 6; i >= 0; i--) {
        f[i] = (char)('0' + frac % 10);
        frac /= 10;
    }
    int last = 6;
    while (last > 0 && f[last] == '0') last--;
    memcpy(o, f, (size_t)last + 1);
    o += last + 1;
    return o - out;
}

/* splice(data, spans, segments): segments is a list of (first span index, float64 buffer) whose values
 * replace the numbers at spans[first:first + len]; each written as logprobs._json_floats does (7 decimals,
 * -inf as -9999.0; NaN, which the encoder writes as null, as null) */
static PyObject *splice(PyObject *self, PyObject *args) {
    Py_buffer data, spans;
    PyObject *segments;
    if (!PyArg_ParseTuple(args, "y*y*O!:splice", &data, &spans, &PyList_Type, &segments)) return NULL;
    PyObject *result = NULL;
    Edit *edits = NULL;
    char *out = NULL;
    const Span *sp = spans.buf;
    Py_ssize_t n_spans = spans.len / (Py_ssize_t)sizeof(Span), n = 0, cap = 0;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(segments); i++) {
        Py_ssize_t first;
        Py_buffer vals;
        if (!PyArg_ParseTuple(PyList_GET_ITEM(segments, i), "ny*:segment", &first, &vals)) goto out;
        Py_ssize_t m = vals.len / (Py_ssize_t)sizeof(double);
        if (vals.len % (Py_ssize_t)sizeof(double) || first < 0 || first + m > n_spans) {
            PyBuffer_Release(&vals);
            PyErr_SetString(PyExc_ValueError, "splice: a segment is outside the spans");
            goto out;
        }
        if (n + m > cap) {
            cap = 2 * (n + m);
            Edit *e = PyMem_Realloc(edits, (size_t)cap * sizeof(Edit));
            if (e == NULL) {
                PyBuffer_Release(&vals);
                PyErr_NoMemory();
                goto out;
            }
            edits = e;
        }
        const double *f = vals.buf;
        for (Py_ssize_t j = 0; j < m; j++) {
            edits[n].span = sp[first + j];
            edits[n].value = f[j];
            n++;
        }
        PyBuffer_Release(&vals);
    }
    if (n > 1) {
        Edit *sorted = in_order(edits, n);
        if (sorted == NULL) goto out;
        edits = sorted;
    }
    /* write_number writes at most 32 characters */
    Py_ssize_t cap_out = data.len + n * 32;
    out = PyMem_Malloc((size_t)cap_out);
    if (out == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    const char *src = data.buf;
    Py_ssize_t at = 0, w = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Edit *e = &edits[i];
        if (e->span.start < at || e->span.end < e->span.start || e->span.end > data.len) {
            PyErr_SetString(PyExc_ValueError, "splice: overlapping or out-of-range spans");
            goto out;
        }
        memcpy(out + w, src + at, (size_t)(e->span.start - at));
        w += e->span.start - at;
        w += write_number(out + w, e->value);
        if (PyErr_Occurred()) goto out;
        at = e->span.end;
    }
    memcpy(out + w, src + at, (size_t)(data.len - at));
    w += data.len - at;
    result = PyBytes_FromStringAndSize(out, w);
out:
    PyMem_Free(out);
    PyMem_Free(edits);
    PyBuffer_Release(&data);
    PyBuffer_Release(&spans);
    return result;
}

static PyObject *key_of(PyObject *self, PyObject *arg) {
    /* the key of one token's text given as its UTF-8 bytes (tests hold it against logprobs.token_key) */
    Py_buffer b;
    if (!PyArg_Parse(arg, "y*:key", &b)) return NULL;
    Str s = {b.buf, b.len, 0, 0};
    int64_t key = 0;
    int rc = token_key_uncached(&s, &key);
    PyBuffer_Release(&b);
    if (rc == ERROR) return NULL;
    if (rc == DECLINE) Py_RETURN_NONE;
    return PyLong_FromLongLong(key);
}

static PyObject *number_of(PyObject *self, PyObject *arg) {
    /* a JSON number's double as the scanner reads it (tests hold it against float()) */
    Py_buffer b;
    if (!PyArg_Parse(arg, "y*:number", &b)) return NULL;
    Scanner sc;
    memset(&sc, 0, sizeof sc);
    sc.s = sc.p = b.buf;
    sc.end = sc.s + b.len;
    Span span;
    int isint;
    double d;
    PyObject *result = NULL;
    if (number(&sc, &span, &isint) || sc.p != sc.end) {
        PyErr_SetString(PyExc_ValueError, "not a JSON number");
    } else if (quick_double(sc.s, sc.end, &d)) {
        result = PyFloat_FromDouble(d);
    } else {
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&b);
    return result;
}

static PyMethodDef methods[] = {
    {"number", number_of, METH_O, "number(text) -> float | None: a JSON number read quickly (None: slow path)"},
    {"scan", scan, METH_VARARGS,
     "scan(data, chat) -> (choices, usage, spans) | None: the logprobs of a buffered answer, or None when the "
     "reference reader must decide. choices: [(p, k, float32 bytes [p*k + p], int64 key bytes, chars)]."},
    {"splice", splice, METH_VARARGS, "splice(data, spans, [(first, float64 values)]) -> bytes with the values written"},
    {"key", key_of, METH_O, "key(utf8 text) -> int | None: logprobs.token_key of a token's text"},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_lpscan",
                                    "Buffered OpenAI logprobs read and rewritten in place (see logprobs.py).", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__lpscan(void) { return PyModule_Create(&module); }
