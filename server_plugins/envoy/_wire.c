/* Envoy's ext_proc ProcessingRequest read straight from its protobuf bytes, and the body responses written
 * as bytes (body_response, at the end of this file).
 *
 * read(data) -> (kind, payload, end_of_stream), the same answer as server_plugins.envoy.ext_proc's Python
 * reader (protobuf's parser, WhichOneof and headers_of), without building message objects or walking the
 * header list in Python:
 *   kind: the number of the request oneof's field that is set (2 request_headers, 3 response_headers,
 *         4 request_body, 5 response_body, 6 request_trailers, 7 response_trailers), 0 when none is;
 *   payload: for headers, a dict of lower-case name -> value (raw_value read as latin-1 when set, else
 *         value; a repeated name joined with ','); for bodies, the body bytes; else None;
 *   end_of_stream: the headers' or body's flag.
 *
 * Wire semantics follow protobuf's: unknown fields and fields of an unexpected wire type are skipped, a
 * message field that occurs twice is merged (headers appended), a scalar's last occurrence wins, setting
 * another oneof member clears the one before. String fields must be UTF-8. Truncated or malformed input
 * (and the long-deprecated group wire types, which Envoy never sends) raise ValueError.
 *
 * Field numbers (envoy/service/ext_proc/v3/external_processor.proto, config/core/v3/base.proto):
 * HttpHeaders headers 1 (HeaderMap), end_of_stream 3; HttpBody body 1, end_of_stream 2; HeaderMap headers 1
 * (repeated HeaderValue); HeaderValue key 1, value 2, raw_value 3.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    const unsigned char *p, *end;
} Buf;

static int fail(const char *what) {
    PyErr_Format(PyExc_ValueError, "malformed ext_proc message: %s", what);
    return -1;
}

static int varint(Buf *b, uint64_t *out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (b->p >= b->end)
            return fail("truncated varint");
        unsigned char c = *b->p++;
        v |= (uint64_t)(c & 0x7F) << shift;
        if (!(c & 0x80)) {
            *out = v;
            return 0;
        }
    }
    return fail("varint longer than 10 bytes");
}

/* the next field's number and wire type; 0 at the end of the buffer */
static int tag(Buf *b, uint32_t *field, int *wt) {
    uint64_t t;
    if (varint(b, &t) < 0)
        return -1;
    if (t >> 3 == 0 || t >> 3 > 0x1FFFFFFF)
        return fail("bad field number");
    *field = (uint32_t)(t >> 3);
    *wt = (int)(t & 7);
    return 1;
}

/* a length-delimited field's payload, as a sub-buffer */
static int span(Buf *b, Buf *sub) {
    uint64_t n;
    if (varint(b, &n) < 0)
        return -1;
    if (n > (uint64_t)(b->end - b->p))
        return fail("length past the end");
    sub->p = b->p;
    sub->end = b->p + n;
    b->p += n;
    return 0;
}

static int skip(Buf *b, int wt) {
    uint64_t v;
    Buf sub;
    switch (wt) {
    case 0:
        return varint(b, &v);
    case 1:
        if (b->end - b->p < 8)
            return fail("truncated fixed64");
        b->p += 8;
        return 0;
    case 2:
        return span(b, &sub);
    case 5:
        if (b->end - b->p < 4)
            return fail("truncated fixed32");
        b->p += 4;
        return 0;
    default:
        return fail("unsupported wire type");
    }
}

/* a str from UTF-8 bytes, as protobuf's string fields require */
static PyObject *utf8(Buf s) {
    return PyUnicode_DecodeUTF8((const char *)s.p, s.end - s.p, "strict");
}

static PyObject *lower_key(Buf k) {
    Py_ssize_t n = k.end - k.p;
    int ascii = 1;
    for (Py_ssize_t i = 0; i < n; i++)
        if (k.p[i] & 0x80) {
            ascii = 0;
            break;
        }
    if (!ascii) { /* str.lower() for the rest, after the UTF-8 check */
        PyObject *s = utf8(k);
        if (s == NULL)
            return NULL;
        PyObject *l = PyObject_CallMethod(s, "lower", NULL);
        Py_DECREF(s);
        return l;
    }
    PyObject *s = PyUnicode_New(n, 127);
    if (s == NULL)
        return NULL;
    Py_UCS1 *d = PyUnicode_1BYTE_DATA(s);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = k.p[i];
        d[i] = (c >= 'A' && c <= 'Z') ? (Py_UCS1)(c + 32) : c;
    }
    return s;
}

/* one HeaderValue into the dict */
static int header_value(Buf b, PyObject *dict) {
    Buf key = {b.p, b.p}, value = {b.p, b.p}, raw = {b.p, b.p};
    uint32_t f;
    int wt, r;
    while (b.p < b.end) {
        if ((r = tag(&b, &f, &wt)) < 0)
            return -1;
        if (wt == 2 && f >= 1 && f <= 3) {
            Buf *dst = f == 1 ? &key : f == 2 ? &value : &raw;
            if (span(&b, dst) < 0)
                return -1;
        } else if (skip(&b, wt) < 0) {
            return -1;
        }
    }
    PyObject *k = lower_key(key);
    if (k == NULL)
        return -1;
    PyObject *v;
    if (value.end > value.p) { /* a string field: checked even when raw_value wins */
        v = utf8(value);
        if (v != NULL && raw.end > raw.p) {
            Py_DECREF(v);
            v = PyUnicode_DecodeLatin1((const char *)raw.p, raw.end - raw.p, NULL);
        }
    } else if (raw.end > raw.p) {
        v = PyUnicode_DecodeLatin1((const char *)raw.p, raw.end - raw.p, NULL);
    } else {
        v = PyUnicode_New(0, 127);
    }
    if (v == NULL) {
        Py_DECREF(k);
        return -1;
    }
    PyObject *had = PyDict_GetItemWithError(dict, k); /* borrowed */
    if (had != NULL) {
        PyObject *joined = PyUnicode_FromFormat("%U,%U", had, v);
        Py_DECREF(v);
        v = joined;
    } else if (PyErr_Occurred()) {
        Py_DECREF(v);
        v = NULL;
    }
    r = v == NULL ? -1 : PyDict_SetItem(dict, k, v);
    Py_DECREF(k);
    Py_XDECREF(v);
    return r;
}

static int header_map(Buf b, PyObject *dict) {
    uint32_t f;
    int wt;
    while (b.p < b.end) {
        if (tag(&b, &f, &wt) < 0)
            return -1;
        if (f == 1 && wt == 2) {
            Buf sub;
            if (span(&b, &sub) < 0 || header_value(sub, dict) < 0)
                return -1;
        } else if (skip(&b, wt) < 0) {
            return -1;
        }
    }
    return 0;
}

typedef struct {
    uint32_t kind;
    PyObject *payload; /* owned: a dict (headers), bytes (body) or NULL */
    int eos;
} State;

static void reset(State *s, uint32_t kind) {
    Py_CLEAR(s->payload);
    s->kind = kind;
    s->eos = 0;
}

/* one oneof member into the state: HttpHeaders (headers 1, end_of_stream 3), HttpBody (body 1,
 * end_of_stream 2) or HttpTrailers (trailers 1: answered, never read, but checked as protobuf checks it) */
static int member(Buf b, State *s) {
    int headers = s->kind <= 3, body = s->kind == 4 || s->kind == 5;
    uint32_t eos_field = headers ? 3 : body ? 2 : 0, f;
    int wt;
    if (headers && s->payload == NULL && (s->payload = PyDict_New()) == NULL)
        return -1;
    while (b.p < b.end) {
        if (tag(&b, &f, &wt) < 0)
            return -1;
        if (f == 1 && wt == 2) {
            Buf sub;
            if (span(&b, &sub) < 0)
                return -1;
            if (body) {
                Py_XSETREF(s->payload, PyBytes_FromStringAndSize((const char *)sub.p, sub.end - sub.p));
                if (s->payload == NULL)
                    return -1;
                continue;
            }
            PyObject *into = headers ? s->payload : PyDict_New(); /* trailers: a scratch dict */
            if (into == NULL)
                return -1;
            int r = header_map(sub, into);
            if (!headers)
                Py_DECREF(into);
            if (r < 0)
                return -1;
        } else if (f == eos_field && wt == 0) {
            uint64_t v;
            if (varint(&b, &v) < 0)
                return -1;
            s->eos = v != 0;
        } else if (skip(&b, wt) < 0) {
            return -1;
        }
    }
    return 0;
}

static PyObject *read_request(PyObject *self, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    Buf b = {(const unsigned char *)view.buf, (const unsigned char *)view.buf + view.len};
    State s = {0, NULL, 0};
    uint32_t f;
    int wt, ok = 0;
    while (b.p < b.end) {
        if (tag(&b, &f, &wt) < 0)
            goto done;
        if (f >= 2 && f <= 7 && wt == 2) {
            Buf sub;
            if (span(&b, &sub) < 0)
                goto done;
            if (f != s.kind)
                reset(&s, f);
            if (member(sub, &s) < 0)
                goto done;
        } else if (skip(&b, wt) < 0) {
            goto done;
        }
    }
    ok = 1;
done:
    PyBuffer_Release(&view);
    if (!ok) {
        Py_XDECREF(s.payload);
        return NULL;
    }
    if (s.payload == NULL && (s.kind == 4 || s.kind == 5))
        s.payload = PyBytes_FromStringAndSize("", 0);
    if (s.payload == NULL && (s.kind == 2 || s.kind == 3))
        s.payload = PyDict_New();
    if (s.payload == NULL && PyErr_Occurred())
        return NULL;
    PyObject *payload = s.payload != NULL ? s.payload : Py_NewRef(Py_None);
    PyObject *out = Py_BuildValue("(INO)", s.kind, payload, s.eos ? Py_True : Py_False);
    return out;
}

/* ---- the body responses, written ---------------------------------------------------------------------
 * body_response(which, data, set_headers, remove) -> bytes: a serialized ProcessingResponse whose field
 * ``which`` (3 request_body, 4 response_body) is a BodyResponse replacing the body with ``data`` (clear_body
 * when empty) and setting (OVERWRITE_IF_EXISTS_OR_ADD) and removing these headers: the bytes
 * SerializeToString gives, as ext_proc.body_response_py writes them. set_headers: (name, value) pairs, the
 * name as UTF-8 and the value as latin-1 raw_value (a value outside latin-1 raises UnicodeEncodeError);
 * remove: names. Field numbers: ProcessingResponse request_body 3 / response_body 4 -> BodyResponse
 * response 1 -> CommonResponse header_mutation 2, body_mutation 3 -> BodyMutation body 1 | clear_body 2;
 * HeaderMutation set_headers 1, remove_headers 2; HeaderValueOption header 1, append_action 3;
 * HeaderValue key 1, raw_value 3. */

static Py_ssize_t varint_len(uint64_t n) {
    Py_ssize_t k = 1;
    while (n >= 0x80) {
        n >>= 7;
        k++;
    }
    return k;
}

static unsigned char *put_varint(unsigned char *q, uint64_t n) {
    while (n >= 0x80) {
        *q++ = (unsigned char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    *q++ = (unsigned char)n;
    return q;
}

/* a length-delimited field with a one-byte tag: its whole size for a payload of n bytes */
static inline Py_ssize_t field_len(Py_ssize_t n) { return 1 + varint_len((uint64_t)n) + n; }

static unsigned char *put_field(unsigned char *q, unsigned char tag, const char *data, Py_ssize_t n) {
    *q++ = tag;
    q = put_varint(q, (uint64_t)n);
    memcpy(q, data, (size_t)n);
    return q + n;
}

typedef struct {
    const char *key, *value;
    Py_ssize_t nkey, nvalue, hv, option; /* sizes of HeaderValue and HeaderValueOption */
    PyObject *owned;                      /* the latin-1 copy of a value that is not stored as one */
} Header;

#define STACK_HEADERS 16 /* more take a heap array */

static int header_of(PyObject *pair, Header *h) {
    if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_SetString(PyExc_TypeError, "set_headers must hold (name, value) pairs");
        return -1;
    }
    PyObject *k = PyTuple_GET_ITEM(pair, 0), *v = PyTuple_GET_ITEM(pair, 1);
    if (!PyUnicode_Check(k) || !PyUnicode_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "header names and values must be str");
        return -1;
    }
    h->owned = NULL;
    if ((h->key = PyUnicode_AsUTF8AndSize(k, &h->nkey)) == NULL)
        return -1;
    if (PyUnicode_IS_ASCII(v)) { /* ASCII: its UTF-8 is its latin-1 */
        h->value = (const char *)PyUnicode_DATA(v);
        h->nvalue = PyUnicode_GET_LENGTH(v);
    } else {
        if ((h->owned = PyUnicode_AsLatin1String(v)) == NULL)
            return -1;
        h->value = PyBytes_AS_STRING(h->owned);
        h->nvalue = PyBytes_GET_SIZE(h->owned);
    }
    /* proto3 leaves an empty string out */
    h->hv = (h->nkey ? field_len(h->nkey) : 0) + (h->nvalue ? field_len(h->nvalue) : 0);
    h->option = field_len(h->hv) + 2; /* header (1), append_action (3) = 2 */
    return 0;
}

static PyObject *body_response(PyObject *self, PyObject *args) {
    int which;
    Py_buffer data;
    PyObject *set_headers, *remove;
    if (!PyArg_ParseTuple(args, "iy*OO:body_response", &which, &data, &set_headers, &remove))
        return NULL;
    PyObject *out = NULL, *hs = NULL, *rs = NULL;
    Header stack[STACK_HEADERS], *heads = stack;
    Py_ssize_t nh = 0, nr = 0, hm = 0; /* hm: HeaderMutation's size */
    Py_ssize_t mutation, common, total;
    unsigned char *q;
    if (which != 3 && which != 4) {
        PyErr_SetString(PyExc_ValueError, "which must be 3 (request_body) or 4 (response_body)");
        goto done;
    }
    hs = PySequence_Fast(set_headers, "set_headers must be a sequence");
    rs = hs ? PySequence_Fast(remove, "remove must be a sequence") : NULL;
    if (rs == NULL)
        goto done;
    if (PySequence_Fast_GET_SIZE(hs) > STACK_HEADERS &&
        (heads = PyMem_New(Header, PySequence_Fast_GET_SIZE(hs))) == NULL) {
        heads = stack;
        PyErr_NoMemory();
        goto done;
    }
    for (; nh < PySequence_Fast_GET_SIZE(hs); nh++) {
        if (header_of(PySequence_Fast_GET_ITEM(hs, nh), &heads[nh]) < 0)
            goto done;
        hm += field_len(heads[nh].option);
    }
    nr = PySequence_Fast_GET_SIZE(rs);
    for (Py_ssize_t i = 0; i < nr; i++) {
        PyObject *name = PySequence_Fast_GET_ITEM(rs, i);
        Py_ssize_t n;
        if (!PyUnicode_Check(name)) {
            PyErr_SetString(PyExc_TypeError, "header names must be str");
            goto done;
        }
        if (PyUnicode_AsUTF8AndSize(name, &n) == NULL)
            goto done;
        hm += field_len(n);
    }
    mutation = data.len ? field_len(data.len) : 2; /* BodyMutation: body (1) | clear_body (2) */
    common = (nh || nr ? field_len(hm) : 0) + field_len(mutation);
    total = field_len(field_len(common));
    if ((out = PyBytes_FromStringAndSize(NULL, total)) == NULL)
        goto done;
    q = (unsigned char *)PyBytes_AS_STRING(out);
    *q++ = (unsigned char)(which << 3 | 2);
    q = put_varint(q, (uint64_t)field_len(common));
    *q++ = 0x0a; /* BodyResponse.response (1) */
    q = put_varint(q, (uint64_t)common);
    if (nh || nr) {
        *q++ = 0x12; /* CommonResponse.header_mutation (2) */
        q = put_varint(q, (uint64_t)hm);
        for (Py_ssize_t i = 0; i < nh; i++) {
            Header *h = &heads[i];
            *q++ = 0x0a; /* set_headers (1) */
            q = put_varint(q, (uint64_t)h->option);
            *q++ = 0x0a; /* HeaderValueOption.header (1) */
            q = put_varint(q, (uint64_t)h->hv);
            if (h->nkey)
                q = put_field(q, 0x0a, h->key, h->nkey); /* HeaderValue.key (1) */
            if (h->nvalue)
                q = put_field(q, 0x1a, h->value, h->nvalue); /* HeaderValue.raw_value (3) */
            *q++ = 0x18; /* append_action (3) = OVERWRITE_IF_EXISTS_OR_ADD */
            *q++ = 0x02;
        }
        for (Py_ssize_t i = 0; i < nr; i++) {
            Py_ssize_t n;
            const char *name = PyUnicode_AsUTF8AndSize(PySequence_Fast_GET_ITEM(rs, i), &n);
            q = put_field(q, 0x12, name, n); /* remove_headers (2) */
        }
    }
    *q++ = 0x1a; /* CommonResponse.body_mutation (3) */
    q = put_varint(q, (uint64_t)mutation);
    if (data.len) {
        q = put_field(q, 0x0a, (const char *)data.buf, data.len);
    } else {
        *q++ = 0x10; /* clear_body (2) = true */
        *q++ = 0x01;
    }
    if (q != (unsigned char *)PyBytes_AS_STRING(out) + total) { /* cannot happen: the sizes above are the writes */
        Py_CLEAR(out);
        PyErr_SetString(PyExc_SystemError, "body_response: size mismatch");
    }
done:
    for (Py_ssize_t i = 0; i < nh; i++)
        Py_XDECREF(heads[i].owned);
    if (heads != stack)
        PyMem_Free(heads);
    Py_XDECREF(hs);
    Py_XDECREF(rs);
    PyBuffer_Release(&data);
    return out;
}

static PyMethodDef methods[] = {
    {"read", read_request, METH_O,
     "read(data) -> (kind, payload, end_of_stream): an ext_proc ProcessingRequest's oneof field number, its "
     "headers (dict) or body (bytes), and its end_of_stream flag"},
    {"body_response", body_response, METH_VARARGS,
     "body_response(which, data, set_headers, remove) -> bytes: a serialized ProcessingResponse replacing the "
     "request (3) or response (4) body with data and changing these headers"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_wire",
                                    "Envoy ext_proc ProcessingRequest reader and body response writer "
                                    "(see server_plugins/envoy/_wire.c).",
                                    -1, methods};

PyMODINIT_FUNC PyInit__wire(void) { return PyModule_Create(&module); }
