/* Hot loops of the PostgreSQL relay, in C: framing, DataRow runs, the recognisers of the
 * fast paths (one statement, its whole answer) and the guard's literal shape; see
 * proxy/pg/_wire.pyi.
 *
 * How this works. Each function mirrors a pure-Python twin (framer.py_split,
 * runs.py_rewrite_run, runs.py_text_cells, fast.py_reply_stretch,
 * fast.py_batch, sqlshape.py_shape) byte for byte; the tests run both on the
 * same inputs, malformed ones included. Nothing here keeps state or does I/O: buffers
 * come in through the buffer protocol and results go out as new bytes objects.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static inline int32_t rd32(const unsigned char *p) {
    return (int32_t)(((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | (uint32_t)p[3]);
}

static inline int16_t rd16(const unsigned char *p) { return (int16_t)(((uint16_t)p[0] << 8) | (uint16_t)p[1]); }

static inline void wr32(unsigned char *p, int32_t v) {
    uint32_t u = (uint32_t)v;
    p[0] = (unsigned char)(u >> 24);
    p[1] = (unsigned char)(u >> 16);
    p[2] = (unsigned char)(u >> 8);
    p[3] = (unsigned char)u;
}

/* ---- a growable output buffer ---------------------------------------------------- */

typedef struct {
    unsigned char *data;
    Py_ssize_t len;
    Py_ssize_t cap;
} Out;

static int out_reserve(Out *o, Py_ssize_t more) {
    if (o->len + more <= o->cap) return 0;
    Py_ssize_t cap = o->cap ? o->cap : 4096;
    while (cap < o->len + more) cap *= 2;
    unsigned char *d = PyMem_Realloc(o->data, (size_t)cap);
    if (d == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    o->data = d;
    o->cap = cap;
    return 0;
}

static inline int out_put(Out *o, const void *src, Py_ssize_t n) {
    if (out_reserve(o, n) < 0) return -1;
    memcpy(o->data + o->len, src, (size_t)n);
    o->len += n;
    return 0;
}

static PyObject *out_bytes(Out *o) {
    PyObject *b = PyBytes_FromStringAndSize((const char *)o->data, o->len);
    PyMem_Free(o->data);
    o->data = NULL;
    return b;
}

/* ---- split ------------------------------------------------------------------------ */

static PyObject *frame_tuple(long type, Py_ssize_t start, Py_ssize_t stop) {
    PyObject *t = PyLong_FromLong(type), *a = PyLong_FromSsize_t(start), *b = PyLong_FromSsize_t(stop);
    PyObject *tup = (t && a && b) ? PyTuple_Pack(3, t, a, b) : NULL;
    Py_XDECREF(t);
    Py_XDECREF(a);
    Py_XDECREF(b);
    return tup;
}

static int append_frame(PyObject *out, long type, Py_ssize_t start, Py_ssize_t stop) {
    PyObject *tup = frame_tuple(type, start, stop);
    if (tup == NULL) return -1;
    int rc = PyList_Append(out, tup);
    Py_DECREF(tup);
    return rc;
}

/* split(buf, pos, max_length, out, coalesce_rows) -> (consumed, need, bad_type)
 * bad_type >= 0: the message at `consumed` has the invalid length `need`. */
static PyObject *wire_split(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos;
    long long max_length;
    PyObject *out;
    int coalesce;
    if (!PyArg_ParseTuple(args, "y*nLO!p", &view, &pos, &max_length, &PyList_Type, &out, &coalesce)) return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t end = view.len;
    long long need = 5;
    long bad = -1;
    if (pos < 0) pos = 0;
    while (end - pos >= 5) {
        long type = buf[pos];
        int32_t length = rd32(buf + pos + 1);
        if (length < 4 || length > max_length) {
            need = length;
            bad = type;
            goto done;
        }
        Py_ssize_t stop = pos + 1 + (Py_ssize_t)length;
        if (stop > end) {
            need = 1 + (long long)length;
            goto done;
        }
        if (type == 0x44 && coalesce) {
            Py_ssize_t start = pos;
            long count = 1;
            pos = stop;
            while (end - pos >= 5 && buf[pos] == 0x44) {
                length = rd32(buf + pos + 1);
                if (length < 4 || length > max_length) {
                    need = length;
                    bad = 0x44;
                    goto done;
                }
                stop = pos + 1 + (Py_ssize_t)length;
                if (stop > end) break;
                count++;
                pos = stop;
            }
            if (append_frame(out, -1 - count, start, pos) < 0) goto fail;
            continue;
        }
        if (append_frame(out, type, pos, stop) < 0) goto fail;
        pos = stop;
    }
done:
    PyBuffer_Release(&view);
    return Py_BuildValue("nLl", pos, need, bad);
fail:
    PyBuffer_Release(&view);
    return NULL;
}

/* ---- rewrite_run ---------------------------------------------------------------------
 * ops: one byte per column: 0 skip, 1 scan (detectors read it), 2 apply (call back),
 * 3 NULL, 4 partial (fast when ASCII and 4 < size <= 256, else call back), 5 fixed cell. */

enum { OP_SKIP, OP_SCAN, OP_APPLY, OP_NULLED, OP_PARTIAL, OP_FIXED };

static PyObject *malformed(PyObject *err, const char *msg) {
    PyErr_SetString(err, msg);
    return NULL;
}

static char STARS[256];
static const unsigned char NULL_CELL[4] = {0xff, 0xff, 0xff, 0xff};

/* rewrite_run(buf, s, e, ops, fixed, strategies, apply, scanning, err) -> (blob, plain | None) */
static PyObject *wire_rewrite_run(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view, opsv;
    Py_ssize_t s, e;
    PyObject *fixed, *strategies, *apply, *err;
    int scanning;
    if (!PyArg_ParseTuple(args, "y*nny*O!O!OpO", &view, &s, &e, &opsv, &PyTuple_Type, &fixed, &PyTuple_Type,
                          &strategies, &apply, &scanning, &err))
        return NULL;
    const unsigned char *buf = view.buf;
    const unsigned char *ops = opsv.buf;
    Py_ssize_t width = opsv.len, buflen = view.len;
    Out o = {0}, plain = {0};
    Py_ssize_t nplain = 0;
    PyObject *result = NULL;
    if (PyTuple_GET_SIZE(fixed) != width || PyTuple_GET_SIZE(strategies) != width) {
        PyErr_SetString(PyExc_ValueError, "ops, fixed and strategies differ in length");
        goto out;
    }
    Py_ssize_t pos = s;
    while (pos < e) {
        if (pos + 7 > buflen) {
            malformed(err, "malformed DataRow");
            goto out;
        }
        Py_ssize_t stop = pos + 1 + (Py_ssize_t)rd32(buf + pos + 1);
        if (rd16(buf + pos + 5) != width) {
            malformed(err, "malformed DataRow (cells do not match the RowDescription)");
            goto out;
        }
        Py_ssize_t head = o.len;
        if (out_reserve(&o, 5) < 0) goto out;
        o.data[o.len] = 0x44;
        o.len += 5; /* length patched below */
        Py_ssize_t p = pos + 7, seg = pos + 5;
        for (Py_ssize_t i = 0; i < width; i++) {
            if (p + 4 > buflen) {
                malformed(err, "malformed DataRow");
                goto out;
            }
            int32_t size = rd32(buf + p);
            if (size < 0) {
                p += 4;
                continue;
            }
            if (p + 4 + (Py_ssize_t)size > buflen) {
                malformed(err, "malformed DataRow");
                goto out;
            }
            unsigned char op = ops[i];
            if (op < OP_APPLY) {
                if (op == OP_SCAN && scanning) {
                    if (nplain++ && out_put(&plain, "", 1) < 0) goto out;
                    if (out_put(&plain, buf + p + 4, size) < 0) goto out;
                }
                p += 4 + size;
                continue;
            }
            if (out_put(&o, buf + seg, p - seg) < 0) goto out;
            const unsigned char *cell = buf + p + 4;
            if (op == OP_FIXED) {
                PyObject *f = PyTuple_GET_ITEM(fixed, i);
                if (!PyBytes_Check(f)) {
                    PyErr_SetString(PyExc_TypeError, "fixed cell must be bytes");
                    goto out;
                }
                if (out_put(&o, PyBytes_AS_STRING(f), PyBytes_GET_SIZE(f)) < 0) goto out;
            } else if (op == OP_NULLED) {
                if (out_put(&o, NULL_CELL, 4) < 0) goto out;
            } else {
                int fast = 0;
                if (op == OP_PARTIAL && size > 4 && size <= 256) {
                    fast = 1;
                    for (int32_t k = 0; k < size; k++) {
                        if (cell[k] & 0x80) {
                            fast = 0;
                            break;
                        }
                    }
                }
                if (fast) {
                    if (out_put(&o, buf + p, 4) < 0 || out_put(&o, STARS, size - 4) < 0 ||
                        out_put(&o, cell + size - 4, 4) < 0)
                        goto out;
                } else {
                    PyObject *arg = PyBytes_FromStringAndSize((const char *)cell, size);
                    if (arg == NULL) goto out;
                    PyObject *new = PyObject_CallFunctionObjArgs(apply, arg, PyTuple_GET_ITEM(strategies, i), NULL);
                    Py_DECREF(arg);
                    if (new == NULL) goto out;
                    if (!PyBytes_Check(new)) {
                        Py_DECREF(new);
                        PyErr_SetString(PyExc_TypeError, "apply must return bytes");
                        goto out;
                    }
                    unsigned char len[4];
                    wr32(len, (int32_t)PyBytes_GET_SIZE(new));
                    int rc = out_put(&o, len, 4) < 0 || out_put(&o, PyBytes_AS_STRING(new), PyBytes_GET_SIZE(new)) < 0;
                    Py_DECREF(new);
                    if (rc) goto out;
                }
            }
            p += 4 + size;
            seg = p;
        }
        if (p != stop) {
            malformed(err, "malformed DataRow");
            goto out;
        }
        if (out_put(&o, buf + seg, stop - seg) < 0) goto out;
        wr32(o.data + head + 1, (int32_t)(o.len - head - 1));
        pos = stop;
    }
    {
        PyObject *blob = out_bytes(&o);
        if (blob == NULL) goto out;
        PyObject *pl;
        if (nplain) {
            pl = out_bytes(&plain);
            if (pl == NULL) {
                Py_DECREF(blob);
                goto out;
            }
        } else {
            pl = Py_NewRef(Py_None);
        }
        result = PyTuple_Pack(2, blob, pl);
        Py_DECREF(blob);
        Py_DECREF(pl);
    }
out:
    PyMem_Free(o.data);
    PyMem_Free(plain.data);
    PyBuffer_Release(&view);
    PyBuffer_Release(&opsv);
    return result;
}

/* text_cells(buf, s, e, readable) -> the readable non-NULL cells of the run joined by NUL,
 * or None when a row does not have one cell per readable flag or overruns the run. */
static PyObject *wire_text_cells(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view, rv;
    Py_ssize_t s, e;
    if (!PyArg_ParseTuple(args, "y*nny*", &view, &s, &e, &rv)) return NULL;
    const unsigned char *buf = view.buf, *readable = rv.buf;
    Py_ssize_t width = rv.len;
    Out o = {0};
    Py_ssize_t n = 0;
    PyObject *result = NULL;
    if (e > view.len) e = view.len;
    Py_ssize_t pos = s;
    while (pos < e) {
        if (pos + 7 > e) goto none;
        Py_ssize_t stop = pos + 1 + (Py_ssize_t)rd32(buf + pos + 1);
        if (stop > e || rd16(buf + pos + 5) != width) goto none;
        Py_ssize_t p = pos + 7;
        for (Py_ssize_t i = 0; i < width; i++) {
            if (p + 4 > stop) goto none;
            int32_t size = rd32(buf + p);
            p += 4;
            if (size < 0) continue;
            if (p + (Py_ssize_t)size > stop) goto none;
            if (readable[i]) {
                if (n++ && out_put(&o, "", 1) < 0) goto out;
                if (out_put(&o, buf + p, size) < 0) goto out;
            }
            p += size;
        }
        if (p != stop) goto none;
        pos = stop;
    }
    result = o.data ? out_bytes(&o) : PyBytes_FromStringAndSize("", 0);
    goto out;
none:
    result = Py_NewRef(Py_None);
out:
    PyMem_Free(o.data);
    PyBuffer_Release(&view);
    PyBuffer_Release(&rv);
    return result;
}

/* ---- reply_stretch --------------------------------------------------------------------
 * reply_stretch(buf, max_length) -> (pre, ts, te, ds, de, rows, cs, ce, status) | None
 * Whether `buf` is exactly one statement's answer: ParseComplete? BindComplete?
 * (RowDescription DataRow*)? CommandComplete ReadyForQuery, nothing before or after.
 * pre: bit 1 ParseComplete, bit 2 BindComplete; ts/te the RowDescription (-1 when absent),
 * ds/de the run of DataRows (empty at te), cs/ce the CommandComplete; status the byte of
 * ReadyForQuery. None for anything else, a bad length included: the general path decides. */

static int msg_at(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, long long max_length, int type,
                  Py_ssize_t *stop) {
    if (end - pos < 5 || buf[pos] != type) return 0;
    int32_t length = rd32(buf + pos + 1);
    if (length < 4 || length > max_length || (Py_ssize_t)length > end - pos - 1) return 0;
    *stop = pos + 1 + (Py_ssize_t)length;
    return 1;
}

static PyObject *wire_reply_stretch(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    long long max_length;
    if (!PyArg_ParseTuple(args, "y*L", &view, &max_length)) return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t end = view.len, pos = 0, stop = 0;
    long pre = 0, rows = 0;
    Py_ssize_t ts = -1, te = -1, ds, de, cs, ce;
    int status;
    if (msg_at(buf, pos, end, max_length, '1', &stop)) {
        if (stop != pos + 5) goto none;
        pre |= 1;
        pos = stop;
    }
    if (msg_at(buf, pos, end, max_length, '2', &stop)) {
        if (stop != pos + 5) goto none;
        pre |= 2;
        pos = stop;
    }
    if (msg_at(buf, pos, end, max_length, 'T', &stop)) {
        ts = pos;
        te = pos = stop;
    }
    ds = pos;
    while (ts >= 0 && msg_at(buf, pos, end, max_length, 'D', &stop)) {
        rows++;
        pos = stop;
    }
    de = pos;
    if (!msg_at(buf, pos, end, max_length, 'C', &stop) || stop - pos < 6) goto none;
    cs = pos;
    ce = pos = stop;
    if (!msg_at(buf, pos, end, max_length, 'Z', &stop) || stop != pos + 6 || stop != end) goto none;
    status = buf[pos + 5];
    PyBuffer_Release(&view);
    return Py_BuildValue("lnnnnlnni", pre, ts, te, ds, de, rows, cs, ce, status);
none:
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* ---- shape ------------------------------------------------------------------------------
 * shape(sql) -> str | None, for an ASCII str only (see sqlshape.py_shape, its twin): None when
 * the text holds a comment, a backslash, '&' or a '$' not followed by a digit; else the text
 * with each '...' literal and each number literal replaced by '?', "..." identifiers kept.
 * A number is the longest digits[.digits][(e|E)[+|-]digits] at a position not preceded by a
 * word character, '$' or '.', and it counts only when not followed by one of those. */

static inline int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

static inline int is_word(unsigned char c) {
    return is_digit(c) || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_';
}

static inline int sticks(unsigned char c) { return is_word(c) || c == '$' || c == '.'; }

static PyObject *wire_shape(PyObject *Py_UNUSED(self), PyObject *arg) {
    if (!PyUnicode_Check(arg) || !PyUnicode_IS_ASCII(arg)) {
        PyErr_SetString(PyExc_TypeError, "shape() takes an ASCII str");
        return NULL;
    }
    const unsigned char *s = PyUnicode_1BYTE_DATA(arg);
    Py_ssize_t n = PyUnicode_GET_LENGTH(arg);
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = s[i];
        if (c == '\\' || c == '&' || (c == '-' && i + 1 < n && s[i + 1] == '-') ||
            (c == '/' && i + 1 < n && s[i + 1] == '*') || (c == '$' && !(i + 1 < n && is_digit(s[i + 1]))))
            Py_RETURN_NONE;
    }
    PyObject *out = PyUnicode_New(n, 127);
    if (out == NULL) return NULL;
    unsigned char *o = PyUnicode_1BYTE_DATA(out);
    Py_ssize_t k = 0, i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c == '"' || c == '\'') {
            const unsigned char *close = memchr(s + i + 1, c, (size_t)(n - i - 1));
            if (close != NULL) {
                Py_ssize_t j = close - s;
                if (c == '"') {
                    memcpy(o + k, s + i, (size_t)(j + 1 - i));
                    k += j + 1 - i;
                } else {
                    o[k++] = '?';
                }
                i = j + 1;
                continue;
            }
        } else if (is_digit(c) && (i == 0 || !sticks(s[i - 1]))) {
            Py_ssize_t j = i;
            while (j < n && is_digit(s[j])) j++;
            if (j + 1 < n && s[j] == '.' && is_digit(s[j + 1])) {
                j++;
                while (j < n && is_digit(s[j])) j++;
            }
            if (j < n && (s[j] == 'e' || s[j] == 'E')) {
                Py_ssize_t e = j + 1;
                if (e < n && (s[e] == '+' || s[e] == '-')) e++;
                if (e < n && is_digit(s[e])) {
                    while (e < n && is_digit(s[e])) e++;
                    j = e;
                }
            }
            if (j >= n || !sticks(s[j])) {
                o[k++] = '?';
                i = j;
                continue;
            }
        }
        o[k++] = c;
        i++;
    }
    if (k < n) {
        PyObject *cut = PyUnicode_Substring(out, 0, k);
        Py_DECREF(out);
        return cut;
    }
    return out;
}

/* ---- batch ---------------------------------------------------------------------------------
 * batch(buf, max_length) -> (key, portal, statement, result_formats) | None
 * Whether `buf` is exactly [Parse] Bind Describe Execute Sync, each whole and well-sized, with a
 * Bind that decode_bind_head accepts. key: (Parse body or None, Describe body, Execute body),
 * the parts that repeat from one statement to the next; portal and statement: Bind's names
 * (UTF-8, surrogateescape); result_formats: Bind's result-format codes. None for anything else. */

static int i16s(const unsigned char *b, Py_ssize_t n, Py_ssize_t *p, int16_t *count) {
    if (*p + 2 > n) return 0;
    int16_t c = rd16(b + *p);
    if (c < 0 || *p + 2 + 2 * (Py_ssize_t)c > n) return 0;
    *count = c;
    *p += 2;
    return 1;
}

static PyObject *wire_batch(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    long long max_length;
    if (!PyArg_ParseTuple(args, "y*L", &view, &max_length)) return NULL;
    const unsigned char *buf = view.buf;
    Py_ssize_t end = view.len, pos = 0, stop = 0, ps = -1, pe = -1, bs, be, ds, de, es, ee;
    PyObject *result = NULL;
    if (msg_at(buf, pos, end, max_length, 'P', &stop)) {
        ps = pos;
        pe = pos = stop;
    }
    if (!msg_at(buf, pos, end, max_length, 'B', &stop)) goto none;
    bs = pos;
    be = pos = stop;
    if (!msg_at(buf, pos, end, max_length, 'D', &stop)) goto none;
    ds = pos;
    de = pos = stop;
    if (!msg_at(buf, pos, end, max_length, 'E', &stop)) goto none;
    es = pos;
    ee = pos = stop;
    if (!msg_at(buf, pos, end, max_length, 'S', &stop) || stop != pos + 5 || stop != end) goto none;
    {
        const unsigned char *b = buf + bs + 5;
        Py_ssize_t n = be - bs - 5, p = 0;
        const unsigned char *z = memchr(b, 0, (size_t)n);
        if (z == NULL) goto none;
        Py_ssize_t portal_end = z - b;
        p = portal_end + 1;
        z = p < n ? memchr(b + p, 0, (size_t)(n - p)) : NULL;
        if (z == NULL) goto none;
        Py_ssize_t stmt_start = p, stmt_end = z - b;
        p = stmt_end + 1;
        int16_t count;
        if (!i16s(b, n, &p, &count)) goto none; /* parameter formats */
        p += 2 * (Py_ssize_t)count;
        if (p + 2 > n) goto none;
        count = rd16(b + p);
        if (count < 0) goto none;
        p += 2;
        for (int16_t k = 0; k < count; k++) {
            if (p + 4 > n) goto none;
            int32_t size = rd32(b + p);
            p += 4;
            if (size == -1) continue;
            if (size < 0 || p + (Py_ssize_t)size > n) goto none;
            p += size;
        }
        if (!i16s(b, n, &p, &count)) goto none; /* result formats */
        if (p + 2 * (Py_ssize_t)count != n) goto none;
        PyObject *formats = PyTuple_New(count);
        if (formats == NULL) goto out;
        for (int16_t k = 0; k < count; k++) {
            PyObject *v = PyLong_FromLong(rd16(b + p + 2 * k));
            if (v == NULL) {
                Py_DECREF(formats);
                goto out;
            }
            PyTuple_SET_ITEM(formats, k, v);
        }
        PyObject *portal = PyUnicode_DecodeUTF8((const char *)b, portal_end, "surrogateescape");
        PyObject *stmt = PyUnicode_DecodeUTF8((const char *)b + stmt_start, stmt_end - stmt_start, "surrogateescape");
        PyObject *pb = ps >= 0 ? PyBytes_FromStringAndSize((const char *)buf + ps + 5, pe - ps - 5) : Py_NewRef(Py_None);
        PyObject *db = PyBytes_FromStringAndSize((const char *)buf + ds + 5, de - ds - 5);
        PyObject *eb = PyBytes_FromStringAndSize((const char *)buf + es + 5, ee - es - 5);
        PyObject *key = (pb && db && eb) ? PyTuple_Pack(3, pb, db, eb) : NULL;
        if (key && portal && stmt) result = PyTuple_Pack(4, key, portal, stmt, formats);
        Py_XDECREF(pb);
        Py_XDECREF(db);
        Py_XDECREF(eb);
        Py_XDECREF(key);
        Py_XDECREF(portal);
        Py_XDECREF(stmt);
        Py_DECREF(formats);
        goto out;
    }
none:
    result = Py_NewRef(Py_None);
out:
    PyBuffer_Release(&view);
    return result;
}

/* ---- email_hits ----------------------------------------------------------------------------
 * email_hits(data, hits, label) appends (start, end, label) for each email in data, exactly as
 * detectors.py_email_hits (its twin) does: the regex "@" + _DOMAIN found left to right (each
 * search resuming at the previous match's end), then the local part found backwards.
 *
 * _DOMAIN is [A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,63}. Over the text after the "@", cut
 * into dot-separated tokens t0.t1.t2..., backtracking settles on: t0 whole (non-empty), then the
 * non-empty tokens t1..tm that follow it, and the match ends inside the LAST of t1..tm whose run of
 * leading letters is at least 2 long, after at most 63 of those letters; no such token, no match. */

static inline int is_alpha(unsigned char c) { return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z'); }
static inline int is_label(unsigned char c) { return is_alpha(c) || is_digit(c) || c == '-'; }
static inline int is_local(unsigned char c) {
    return is_label(c) || c == '.' || c == '_' || c == '%' || c == '+';
}

static Py_ssize_t domain_end(const unsigned char *s, Py_ssize_t q, Py_ssize_t lim) {
    Py_ssize_t i = q;
    while (i < lim && is_label(s[i])) i++;
    if (i == q) return -1;
    Py_ssize_t best = -1;
    while (i < lim && s[i] == '.') {
        Py_ssize_t a = i + 1, j = a;
        while (j < lim && is_label(s[j])) j++;
        if (j == a) break;
        Py_ssize_t k = a;
        while (k < j && k - a < 63 && is_alpha(s[k])) k++;
        if (k - a >= 2) best = k;
        i = j;
    }
    return best;
}

static PyObject *wire_email_hits(PyObject *Py_UNUSED(self), PyObject *args) {
    Py_buffer view;
    PyObject *hits, *label;
    if (!PyArg_ParseTuple(args, "y*O!O", &view, &PyList_Type, &hits, &label)) return NULL;
    const unsigned char *s = view.buf;
    Py_ssize_t n = view.len, p = 0, done = 0;
    while (p < n) {
        const unsigned char *at = memchr(s + p, '@', (size_t)(n - p));
        if (at == NULL) break;
        Py_ssize_t pos = at - s;
        Py_ssize_t end = domain_end(s, pos + 1, n);
        if (end < 0) {
            p = pos + 1;
            continue;
        }
        p = end;
        /* a run of local-part characters longer than 64: its last 64 (fail closed) */
        Py_ssize_t lo = pos > 64 ? pos - 64 : 0, start = lo;
        for (Py_ssize_t i = pos - 1; i >= lo; i--) {
            if (!is_local(s[i])) {
                start = i + 1;
                break;
            }
        }
        if (done <= start && start < pos) {
            if (end > pos + 256) {
                end = domain_end(s, pos + 1, n < pos + 256 ? n : pos + 256);
                if (end < 0) continue;
            }
            done = end;
            PyObject *hit = Py_BuildValue("(nnO)", start, end, label);
            if (hit == NULL || PyList_Append(hits, hit) < 0) {
                Py_XDECREF(hit);
                PyBuffer_Release(&view);
                return NULL;
            }
            Py_DECREF(hit);
        }
    }
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"split", wire_split, METH_VARARGS, "Frames of a typed message stream (see framer.split)."},
    {"rewrite_run", wire_rewrite_run, METH_VARARGS, "A masked DataRow run rewritten (see runs.rewrite_run)."},
    {"text_cells", wire_text_cells, METH_VARARGS, "Readable cells of a DataRow run joined by NUL."},
    {"batch", wire_batch, METH_VARARGS, "One extended-protocol statement (see fast.batch)."},
    {"shape", wire_shape, METH_O, "A statement's text with its literals replaced (see sqlguard.shape)."},
    {"reply_stretch", wire_reply_stretch, METH_VARARGS, "One statement's whole answer (see fast.reply_stretch)."},
    {"email_hits", wire_email_hits, METH_VARARGS, "Emails in a buffer (see detectors.py_email_hits)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "proxy.pg._wire", NULL, 0, methods};

PyMODINIT_FUNC PyInit__wire(void) {
    memset(STARS, '*', sizeof STARS);
    return PyModule_Create(&module);
}
