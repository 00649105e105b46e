/* memfs._fast: file disk reads without a thread hand-off.
 *
 * A cold 4 KiB read through trio.to_thread costs a thread wake-up and a GIL
 * hand-off (hundreds of µs on a loaded two-core host, tools/bench-fault)
 * for a disk read of ~50 µs.  Linux native AIO on an O_DIRECT descriptor
 * reads asynchronously in the kernel with no thread at all; completions are
 * signalled on an eventfd that the trio loop polls like any other fd.
 *
 *   ctx = AIO(depth)          io_setup + a non-blocking eventfd (ctx.fd)
 *   ctx.submit(fd, buf, offset, key)
 *                             one read of len(buf) bytes at offset into buf
 *                             (a writable buffer, aligned as O_DIRECT wants:
 *                             an anonymous mmap); buf is held until reaped
 *   ctx.reap() -> [(key, result)]
 *                             completed reads (result: bytes read, or -errno);
 *                             clears the eventfd
 *   ctx.close()
 *
 * Only raw syscalls: no libaio needed at build or run time.
 *
 *   scatter(dst, first, page_size, {page: data})
 *                             copy fetched pages into a READ's buffer
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <linux/aio_abi.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    PyObject *key;
    Py_buffer view;
    int used;
} Slot;

typedef struct {
    PyObject_HEAD
    aio_context_t ctx;
    int efd;
    int depth;
    int inflight;
    Slot *slots;
    int *free_list;
    int nfree;
} AIOObject;

static PyObject *
aio_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    AIOObject *self = (AIOObject *)type->tp_alloc(type, 0);
    if (self)
        self->efd = -1;
    return (PyObject *)self;
}

static int
aio_init(AIOObject *self, PyObject *args, PyObject *kw)
{
    static char *kwlist[] = {"depth", NULL};
    int depth = 128;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "|i", kwlist, &depth))
        return -1;
    if (self->ctx) {
        PyErr_SetString(PyExc_ValueError, "AIO already initialised");
        return -1;
    }
    if (depth < 1 || depth > 65536) {
        PyErr_SetString(PyExc_ValueError, "depth must be 1..65536");
        return -1;
    }
    if (syscall(SYS_io_setup, depth, &self->ctx) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (self->efd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        syscall(SYS_io_destroy, self->ctx);
        self->ctx = 0;
        return -1;
    }
    self->depth = depth;
    self->slots = PyMem_Calloc(depth, sizeof(Slot));
    self->free_list = PyMem_Calloc(depth, sizeof(int));
    if (!self->slots || !self->free_list) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < depth; i++)
        self->free_list[i] = depth - 1 - i;
    self->nfree = depth;
    return 0;
}

static void
release_slot(AIOObject *self, int i)
{
    Slot *s = &self->slots[i];
    if (!s->used)
        return;
    PyBuffer_Release(&s->view);
    Py_CLEAR(s->key);
    s->used = 0;
    self->free_list[self->nfree++] = i;
}

static PyObject *
aio_close(AIOObject *self, PyObject *unused)
{
    if (self->ctx) {
        /* io_destroy waits for the reads in flight: their buffers are still ours */
        syscall(SYS_io_destroy, self->ctx);
        self->ctx = 0;
    }
    if (self->slots)
        for (int i = 0; i < self->depth; i++)
            release_slot(self, i);
    self->inflight = 0;
    if (self->efd >= 0) {
        close(self->efd);
        self->efd = -1;
    }
    Py_RETURN_NONE;
}

static void
aio_dealloc(AIOObject *self)
{
    PyObject *r = aio_close(self, NULL);
    Py_XDECREF(r);
    PyMem_Free(self->slots);
    PyMem_Free(self->free_list);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
aio_submit(AIOObject *self, PyObject *args)
{
    int fd;
    PyObject *buf, *key;
    long long offset;
    if (!PyArg_ParseTuple(args, "iOLO", &fd, &buf, &offset, &key))
        return NULL;
    if (!self->ctx) {
        PyErr_SetString(PyExc_ValueError, "AIO context is closed");
        return NULL;
    }
    if (!self->nfree) {
        PyErr_SetString(PyExc_BlockingIOError, "AIO context full");
        return NULL;
    }
    int i = self->free_list[self->nfree - 1];
    Slot *s = &self->slots[i];
    if (PyObject_GetBuffer(buf, &s->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    struct iocb cb;
    memset(&cb, 0, sizeof cb);
    cb.aio_data = (uint64_t)i;
    cb.aio_lio_opcode = IOCB_CMD_PREAD;
    cb.aio_fildes = fd;
    cb.aio_buf = (uint64_t)(uintptr_t)s->view.buf;
    cb.aio_nbytes = (uint64_t)s->view.len;
    cb.aio_offset = offset;
    cb.aio_flags = IOCB_FLAG_RESFD;
    cb.aio_resfd = self->efd;
    struct iocb *cbs[1] = {&cb};
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = syscall(SYS_io_submit, self->ctx, 1, cbs);
    Py_END_ALLOW_THREADS
    if (r != 1) {
        PyBuffer_Release(&s->view);
        if (r < 0)
            return PyErr_SetFromErrno(PyExc_OSError);
        PyErr_SetString(PyExc_OSError, "io_submit accepted no request");
        return NULL;
    }
    Py_INCREF(key);
    s->key = key;
    s->used = 1;
    self->nfree--;
    self->inflight++;
    Py_RETURN_NONE;
}

static PyObject *
aio_reap(AIOObject *self, PyObject *unused)
{
    uint64_t n;
    if (self->efd >= 0 && read(self->efd, &n, sizeof n) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    struct io_event ev[64];
    struct timespec zero = {0, 0};
    while (self->ctx && self->inflight) {
        long got = syscall(SYS_io_getevents, self->ctx, 0, 64, ev, &zero);
        if (got < 0) {
            if (errno == EINTR)
                continue;
            Py_DECREF(out);
            return PyErr_SetFromErrno(PyExc_OSError);
        }
        if (got == 0)
            break;
        for (long j = 0; j < got; j++) {
            int i = (int)ev[j].data;
            Slot *s = &self->slots[i];
            PyObject *item = Py_BuildValue("(OL)", s->key, (long long)ev[j].res);
            release_slot(self, i);
            self->inflight--;
            if (!item || PyList_Append(out, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(out);
                return NULL;
            }
            Py_DECREF(item);
        }
    }
    return out;
}

static PyObject *
aio_get_fd(AIOObject *self, void *closure)
{
    return PyLong_FromLong(self->efd);
}

static PyObject *
aio_get_inflight(AIOObject *self, void *closure)
{
    return PyLong_FromLong(self->inflight);
}

/* scatter(dst, first, page_size, pages): for every (page, data) of the dict
 * pages, copy data (a buffer of page_size bytes) to dst at
 * (page - first) * page_size.  One call instead of a Python slice
 * assignment per page (the fetched pages of a READ, or a push's held
 * pages); everything is checked before the first byte is copied. */
static PyObject *
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

static PyMethodDef fast_functions[] = {
    {"scatter", fast_scatter, METH_VARARGS,
     "scatter(dst, first, page_size, {page: data}): copy each page into dst"},
    {NULL}
};

static PyMethodDef aio_methods[] = {
    {"submit", (PyCFunction)aio_submit, METH_VARARGS,
     "submit(fd, buf, offset, key): read len(buf) bytes at offset into buf"},
    {"reap", (PyCFunction)aio_reap, METH_NOARGS,
     "reap() -> [(key, bytes read or -errno)] of the completed reads"},
    {"close", (PyCFunction)aio_close, METH_NOARGS, "wait for reads in flight, free"},
    {NULL}
};

static PyGetSetDef aio_getset[] = {
    {"fd", (getter)aio_get_fd, NULL, "the eventfd that becomes readable on completion", NULL},
    {"inflight", (getter)aio_get_inflight, NULL, "reads submitted and not reaped", NULL},
    {NULL}
};

static PyTypeObject AIOType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "memfs._fast.AIO",
    .tp_basicsize = sizeof(AIOObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Linux native AIO reads signalled on an eventfd",
    .tp_new = aio_new,
    .tp_init = (initproc)aio_init,
    .tp_dealloc = (destructor)aio_dealloc,
    .tp_methods = aio_methods,
    .tp_getset = aio_getset,
};

static struct PyModuleDef fastmodule = {
    PyModuleDef_HEAD_INIT, "memfs._fast",
    "Compiled helpers for memfs's hot path (Linux native AIO reads, page copies).", -1,
    fast_functions
};

PyMODINIT_FUNC
PyInit__fast(void)
{
    if (PyType_Ready(&AIOType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&fastmodule);
    if (!m)
        return NULL;
    Py_INCREF(&AIOType);
    if (PyModule_AddObject(m, "AIO", (PyObject *)&AIOType) < 0) {
        Py_DECREF(&AIOType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
