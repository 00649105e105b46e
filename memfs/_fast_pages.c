/* memfs._fast, part 2: pages in memory: O_DIRECT read buffers faulted in once
 * and pooled, a run's checksums in one call, scatter and span copies (the
 * module's overview is in _fast.c). */
#include "_fast.h"
#include <dlfcn.h>
#include <errno.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

/* scatter(dst, first, page_size, pages): for every (page, data) of the dict
 * pages, copy data (a buffer of page_size bytes) to dst at
 * (page - first) * page_size.  One call instead of a Python slice
 * assignment per page (the fetched pages of a READ, or a push's held
 * pages); everything is checked before the first byte is copied. */
PyObject *
fast_scatter(PyObject *module, PyObject *args)
{
    Py_buffer dst;
    long long first, ps;
    PyObject *pages;
    if (!PyArg_ParseTuple(args, "w*LLO!", &dst, &first, &ps, &PyDict_Type, &pages))
        return NULL;
    PyObject *ret = NULL;
    Py_ssize_t n = PyDict_Size(pages), pos = 0, i = 0;
    Py_buffer *views = PyMem_Calloc(n ? n : 1, sizeof(Py_buffer));
    long long *at = PyMem_Calloc(n ? n : 1, sizeof(long long));
    PyObject *key, *val;
    if (!views || !at) {
        PyErr_NoMemory();
        goto out;
    }
    if (ps <= 0) {
        PyErr_SetString(PyExc_ValueError, "page_size must be positive");
        goto out;
    }
    while (PyDict_Next(pages, &pos, &key, &val)) {
        long long p = PyLong_AsLongLong(key);
        if (p == -1 && PyErr_Occurred())
            goto out;
        if (PyObject_GetBuffer(val, &views[i], PyBUF_SIMPLE) < 0)
            goto out;
        i++;
        at[i - 1] = (p - first) * ps;
        if (p < first || views[i - 1].len != ps || at[i - 1] + ps > dst.len) {
            PyErr_Format(PyExc_ValueError, "page %lld (%zd bytes) does not fit", p,
                         views[i - 1].len);
            goto out;
        }
    }
    for (Py_ssize_t j = 0; j < i; j++)
        memcpy((char *)dst.buf + at[j], views[j].buf, (size_t)ps);
    ret = Py_None;
    Py_INCREF(ret);
out:
    for (Py_ssize_t j = 0; j < i; j++)
        PyBuffer_Release(&views[j]);
    PyMem_Free(views);
    PyMem_Free(at);
    PyBuffer_Release(&dst);
    return ret;
}

/* ---- Buffer: O_DIRECT read buffers faulted in once ----------------------
 *
 * io_submit pins a read's buffer, and a fresh anonymous mapping is faulted
 * in (allocated, zeroed) right there: a 1 MiB read's submit took ~540 µs
 * into fresh memory and 45-75 µs into memory already faulted in (/var/tmp
 * on ext4, virtio disk, measured).  A Buffer's memory goes back to a small
 * pool when the last view of it is gone (the reply, the deferred store
 * write, the read-ahead window), and the next Buffer of the same size
 * takes it. */

#define BUF_CLASS ((Py_ssize_t)1 << 20) /* sizes are whole MiB (2 MiB from 512 KiB) */
#define BUF_HUGE ((Py_ssize_t)2 << 20)
#define BUF_POOL_MAX 64
static struct {
    char *ptr;
    Py_ssize_t cap;
} buf_pool[BUF_POOL_MAX];
static int buf_npool;
static Py_ssize_t buf_pool_bytes, buf_pool_limit = (Py_ssize_t)16 << 20;
static long long buf_made, buf_reused; /* fresh mappings, and buffers the pool gave */

typedef struct {
    PyObject_HEAD
    char *ptr;
    Py_ssize_t len, cap;
} BufferObject;

static char *
buf_take(Py_ssize_t cap)
{
    for (int i = buf_npool - 1; i >= 0; i--)
        if (buf_pool[i].cap == cap) {
            char *p = buf_pool[i].ptr;
            buf_pool[i] = buf_pool[--buf_npool];
            buf_pool_bytes -= cap;
            buf_reused++;
            return p;
        }
    char *p = mmap(NULL, (size_t)cap, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                   -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    buf_made++;
    /* faulted in by the first io_submit, in the submitter thread (a huge
     * page may need compaction first: ms, measured) */
    if (cap % BUF_HUGE == 0)
        madvise(p, (size_t)cap, MADV_HUGEPAGE); /* small pages if THP is off */
    return p;
}

static void
buf_give(char *p, Py_ssize_t cap)
{
    if (buf_npool < BUF_POOL_MAX && buf_pool_bytes + cap <= buf_pool_limit) {
        buf_pool[buf_npool].ptr = p;
        buf_pool[buf_npool++].cap = cap;
        buf_pool_bytes += cap;
    } else {
        munmap(p, (size_t)cap);
    }
}

static PyObject *
buffer_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"length", NULL};
    Py_ssize_t len;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "n", kwlist, &len))
        return NULL;
    if (len <= 0 || len > ((Py_ssize_t)1 << 32)) {
        PyErr_SetString(PyExc_ValueError, "length must be 1 byte .. 4 GiB");
        return NULL;
    }
    BufferObject *self = (BufferObject *)type->tp_alloc(type, 0);
    if (!self)
        return NULL;
    /* a 1 MiB read gets a whole huge page: faulted in, 2 MiB in one huge
     * page took ~295 µs, 1 MiB in small pages ~660 µs (measured) */
    Py_ssize_t class = len > BUF_HUGE / 4 ? BUF_HUGE : BUF_CLASS;
    self->cap = (len + class - 1) / class * class;
    self->ptr = buf_take(self->cap);
    if (!self->ptr) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    self->len = len;
    return (PyObject *)self;
}

static void
buffer_dealloc(BufferObject *self)
{
    if (self->ptr) /* no view is left: every view holds a reference */
        buf_give(self->ptr, self->cap);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int
buffer_getbuffer(BufferObject *self, Py_buffer *view, int flags)
{
    return PyBuffer_FillInfo(view, (PyObject *)self, self->ptr, self->len, 0, flags);
}

static Py_ssize_t
buffer_length(BufferObject *self)
{
    return self->len;
}

PyObject *
fast_pool(PyObject *module, PyObject *args)
{
    Py_ssize_t limit = -1;
    if (!PyArg_ParseTuple(args, "|n", &limit))
        return NULL;
    if (limit >= 0) {
        buf_pool_limit = limit;
        while (buf_npool && buf_pool_bytes > buf_pool_limit) {
            buf_npool--;
            buf_pool_bytes -= buf_pool[buf_npool].cap;
            munmap(buf_pool[buf_npool].ptr, (size_t)buf_pool[buf_npool].cap);
        }
    }
    return Py_BuildValue("(inLL)", buf_npool, buf_pool_bytes, buf_made, buf_reused);
}

static PyBufferProcs buffer_as_buffer = {(getbufferproc)buffer_getbuffer, NULL};
static PySequenceMethods buffer_as_sequence = {(lenfunc)buffer_length};

PyTypeObject BufferType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfs._fast.Buffer",
    .tp_basicsize = sizeof(BufferObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Buffer(length): page-aligned writable memory, faulted in, pooled",
    .tp_new = buffer_new,
    .tp_dealloc = (destructor)buffer_dealloc,
    .tp_as_buffer = &buffer_as_buffer,
    .tp_as_sequence = &buffer_as_sequence,
};

/* ---- verify: a run's pages against their xxh3 in one call ---------------
 *
 * XXH3_64bits comes from the system's libxxhash (Debian's libxxhash0, which
 * apt itself depends on), found at run time: there is no header to build
 * against, so the one prototype is declared here.  Without the library,
 * has_xxh3() is False and the caller checks page by page in Python. */

typedef uint64_t (*xxh3_fn)(const void *, size_t);
static xxh3_fn xxh3;
static int xxh3_looked;

static xxh3_fn
get_xxh3(void)
{
    if (!xxh3_looked) {
        xxh3_looked = 1;
        void *lib = dlopen("libxxhash.so.0", RTLD_NOW | RTLD_LOCAL);
        if (lib)
            xxh3 = (xxh3_fn)dlsym(lib, "XXH3_64bits");
    }
    return xxh3;
}

PyObject *
fast_has_xxh3(PyObject *module, PyObject *unused)
{
    return PyBool_FromLong(get_xxh3() != NULL);
}

/* verify(data, page_size, sums, pages, good): pages is a sequence of
 * (page, position in data); sums the page map's checksums (8-byte items).
 * Every page whose xxh3 matches goes into good as a view of data; the list
 * of those that do not is returned.  The hashing runs without the GIL. */
PyObject *
fast_verify(PyObject *module, PyObject *args)
{
    PyObject *data, *sums_obj, *pages_obj, *good;
    Py_ssize_t ps;
    if (!PyArg_ParseTuple(args, "O!nOOO!", &PyMemoryView_Type, &data, &ps, &sums_obj,
                          &pages_obj, &PyDict_Type, &good))
        return NULL;
    xxh3_fn h = get_xxh3();
    if (!h) {
        PyErr_SetString(PyExc_RuntimeError, "libxxhash.so.0 (XXH3_64bits) not found");
        return NULL;
    }
    Py_buffer *dv = PyMemoryView_GET_BUFFER(data);
    if (!PyBuffer_IsContiguous(dv, 'C') || ps <= 0) {
        PyErr_SetString(PyExc_ValueError, "data must be contiguous, page_size positive");
        return NULL;
    }
    Py_buffer sums;
    if (PyObject_GetBuffer(sums_obj, &sums, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *seq = NULL, *bad = NULL;
    long long *pg = NULL, *pos = NULL;
    uint64_t *got = NULL;
    if (sums.itemsize != 8) {
        PyErr_SetString(PyExc_ValueError, "sums must hold 8-byte checksums");
        goto out;
    }
    seq = PySequence_Fast(pages_obj, "pages must be a sequence");
    if (!seq)
        goto out;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), nsums = sums.len / 8;
    pg = PyMem_Calloc(n ? n : 1, sizeof *pg);
    pos = PyMem_Calloc(n ? n : 1, sizeof *pos);
    got = PyMem_Calloc(n ? n : 1, sizeof *got);
    if (!pg || !pos || !got) {
        PyErr_NoMemory();
        goto out;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyArg_ParseTuple(item, "LL", &pg[i], &pos[i]))
            goto out;
        if (pg[i] < 0 || pg[i] >= nsums || pos[i] < 0 || pos[i] + ps > dv->len) {
            PyErr_Format(PyExc_ValueError, "page %lld at %lld does not fit", pg[i], pos[i]);
            goto out;
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) /* ~0.45 µs a page: the GIL stays held (io_submit) */
        got[i] = h((const char *)dv->buf + pos[i], (size_t)ps);
    bad = PyList_New(0);
    if (!bad)
        goto out;
    const uint64_t *want = sums.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyLong_FromLongLong(pg[i]), *val = NULL;
        int err = !key;
        if (!err && got[i] == want[pg[i]]) {
            val = PySequence_GetSlice(data, pos[i], pos[i] + ps);
            err = !val || PyDict_SetItem(good, key, val) < 0;
        } else if (!err) {
            err = PyList_Append(bad, key) < 0;
        }
        Py_XDECREF(key);
        Py_XDECREF(val);
        if (err) {
            Py_CLEAR(bad);
            goto out;
        }
    }
out:
    Py_XDECREF(seq);
    PyMem_Free(pg);
    PyMem_Free(pos);
    PyMem_Free(got);
    PyBuffer_Release(&sums);
    return bad;
}

/* span(pages, first, count, page_size): pages[first .. first+count) as one
 * memoryview if they are views lying in order in one buffer (a READ answered
 * with the disk's own buffer, no copy); None otherwise. */
PyObject *
fast_span(PyObject *module, PyObject *args)
{
    PyObject *pages;
    long long first, count, ps;
    if (!PyArg_ParseTuple(args, "O!LLL", &PyDict_Type, &pages, &first, &count, &ps))
        return NULL;
    if (count <= 0 || ps <= 0 || PyDict_Size(pages) < count)
        Py_RETURN_NONE;
    PyObject *exporter = NULL;
    const char *base = NULL;
    for (long long i = 0; i < count; i++) {
        PyObject *key = PyLong_FromLongLong(first + i);
        if (!key)
            return NULL;
        PyObject *v = PyDict_GetItemWithError(pages, key); /* borrowed */
        Py_DECREF(key);
        if (!v) {
            if (PyErr_Occurred())
                return NULL;
            Py_RETURN_NONE;
        }
        if (!PyMemoryView_Check(v))
            Py_RETURN_NONE;
        Py_buffer *b = PyMemoryView_GET_BUFFER(v);
        if (!PyBuffer_IsContiguous(b, 'C') || b->len != ps || !b->obj)
            Py_RETURN_NONE;
        if (i == 0) {
            exporter = b->obj;
            base = b->buf;
        } else if (b->obj != exporter || (const char *)b->buf != base + i * ps) {
            Py_RETURN_NONE;
        }
    }
    PyObject *whole = PyMemoryView_FromObject(exporter);
    if (!whole)
        return NULL;
    Py_buffer *wb = PyMemoryView_GET_BUFFER(whole);
    Py_ssize_t at = base - (const char *)wb->buf;
    PyObject *out;
    if (!PyBuffer_IsContiguous(wb, 'C') || wb->itemsize != 1 || at < 0 ||
            at + count * ps > wb->len) {
        out = Py_None;
        Py_INCREF(out);
    } else {
        out = PySequence_GetSlice(whole, at, at + (Py_ssize_t)(count * ps));
    }
    Py_DECREF(whole);
    return out;
}
