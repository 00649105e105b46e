/* memfs._fast, part 1: Linux native AIO reads on an eventfd (the module's
 * overview is in _fast.c). */
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

typedef struct {
    PyObject *key;
    Py_buffer view;
    struct iocb cb;
    int used;
} Slot;

typedef struct {
    PyObject_HEAD
    aio_context_t ctx;
    int efd;
    int depth;
    int inflight; /* queued or in the kernel, not reaped */
    Slot *slots;
    int *free_list;
    int nfree;
    /* the submitter thread and what it shares with the loop (under mu) */
    pthread_t thread;
    int started, stop;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int *queue; /* slots to submit: a ring of depth */
    int qhead, qlen;
    int *failed; /* slots whose io_submit failed, with their -errno */
    long *failed_res;
    int nfailed;
} AIOObject;

/* Reads up to this many bytes are submitted on the caller's thread: a
 * small read's submit is short, and the hop to the submitter thread cost a
 * 4 KiB fault more than it saved (figure 1 of tools/bench, measured). */
#define AIO_INLINE (128 << 10)

/* Submits the queued reads, in order, a batch per io_submit; a read the
 * kernel refuses completes at once with -errno (the eventfd says so). */
static void *
aio_submitter(void *arg)
{
    AIOObject *self = arg;
    struct iocb *cbs[64];
    int idx[64];
    sigset_t all;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL); /* signals are the loop's */
    pthread_mutex_lock(&self->mu);
    for (;;) {
        while (!self->qlen && !self->stop)
            pthread_cond_wait(&self->cv, &self->mu);
        if (self->stop)
            break;
        int n = 0;
        while (self->qlen && n < 64) {
            idx[n] = self->queue[self->qhead];
            cbs[n] = &self->slots[idx[n]].cb;
            self->qhead = (self->qhead + 1) % self->depth;
            self->qlen--;
            n++;
        }
        pthread_mutex_unlock(&self->mu);
        for (int done = 0; done < n;) {
            long r = syscall(SYS_io_submit, self->ctx, (long)(n - done), cbs + done);
            if (r > 0) {
                done += (int)r;
                continue;
            }
            int err = r < 0 ? errno : EIO;
            if (err == EINTR)
                continue;
            uint64_t one = 1;
            pthread_mutex_lock(&self->mu);
            self->failed[self->nfailed] = idx[done];
            self->failed_res[self->nfailed++] = -err;
            pthread_mutex_unlock(&self->mu);
            if (write(self->efd, &one, sizeof one) < 0) { /* the next reap finds it */ }
            done++;
        }
        pthread_mutex_lock(&self->mu);
    }
    pthread_mutex_unlock(&self->mu);
    return NULL;
}

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
    self->queue = PyMem_Calloc(depth, sizeof(int));
    self->failed = PyMem_Calloc(depth, sizeof(int));
    self->failed_res = PyMem_Calloc(depth, sizeof(long));
    if (!self->slots || !self->free_list || !self->queue || !self->failed ||
            !self->failed_res) {
        PyErr_NoMemory();
        return -1;
    }
    for (int i = 0; i < depth; i++)
        self->free_list[i] = depth - 1 - i;
    self->nfree = depth;
    pthread_mutex_init(&self->mu, NULL);
    pthread_cond_init(&self->cv, NULL);
    int err = pthread_create(&self->thread, NULL, aio_submitter, self);
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->started = 1;
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
    if (self->started) { /* reads it took are submitted; the queued ones never are */
        pthread_mutex_lock(&self->mu);
        self->stop = 1;
        pthread_cond_signal(&self->cv);
        pthread_mutex_unlock(&self->mu);
        Py_BEGIN_ALLOW_THREADS
        pthread_join(self->thread, NULL);
        Py_END_ALLOW_THREADS
        self->started = 0;
        self->qlen = self->nfailed = 0;
    }
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
    PyMem_Free(self->queue);
    PyMem_Free(self->failed);
    PyMem_Free(self->failed_res);
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
    struct iocb *cb = &s->cb;
    memset(cb, 0, sizeof *cb);
    cb->aio_data = (uint64_t)i;
    cb->aio_lio_opcode = IOCB_CMD_PREAD;
    cb->aio_fildes = fd;
    cb->aio_buf = (uint64_t)(uintptr_t)s->view.buf;
    cb->aio_nbytes = (uint64_t)s->view.len;
    cb->aio_offset = offset;
    cb->aio_flags = IOCB_FLAG_RESFD;
    cb->aio_resfd = self->efd;
    /* The GIL is not let go here (a worker thread that took it meanwhile
     * could keep the loop waiting for up to the switch interval, 5 ms). */
    if (s->view.len <= AIO_INLINE) { /* small: submitted here, no thread hop */
        struct iocb *cbs[1] = {cb};
        long r;
        do
            r = syscall(SYS_io_submit, self->ctx, 1L, cbs);
        while (r < 0 && errno == EINTR);
        if (r != 1) { /* completes at once with -errno, as in the thread */
            uint64_t one = 1;
            pthread_mutex_lock(&self->mu);
            self->failed[self->nfailed] = i;
            self->failed_res[self->nfailed++] = r < 0 ? -errno : -EIO;
            pthread_mutex_unlock(&self->mu);
            if (write(self->efd, &one, sizeof one) < 0) { /* the next reap finds it */ }
        }
    } else { /* queued for the submitter thread */
        pthread_mutex_lock(&self->mu);
        self->queue[(self->qhead + self->qlen) % self->depth] = i;
        self->qlen++;
        pthread_cond_signal(&self->cv);
        pthread_mutex_unlock(&self->mu);
    }
    Py_INCREF(key);
    s->key = key;
    s->used = 1;
    self->nfree--;
    self->inflight++;
    Py_RETURN_NONE;
}

/* A finished read: (key, result) appended to out, its slot freed; -1 with
 * an exception set if the list could not take it. */
static int
reaped(AIOObject *self, PyObject *out, int i, long long res)
{
    PyObject *item = Py_BuildValue("(OL)", self->slots[i].key, res);
    release_slot(self, i);
    self->inflight--;
    if (!item || PyList_Append(out, item) < 0) {
        Py_XDECREF(item);
        return -1;
    }
    Py_DECREF(item);
    return 0;
}

static PyObject *
aio_reap(AIOObject *self, PyObject *args)
{
    uint64_t n;
    int clear = 1;
    if (!PyArg_ParseTuple(args, "|p", &clear))
        return NULL;
    if (clear && self->efd >= 0 && read(self->efd, &n, sizeof n) < 0 && errno != EAGAIN)
        return PyErr_SetFromErrno(PyExc_OSError);
    PyObject *out = PyList_New(0);
    if (!out)
        return NULL;
    int failed[64];
    long failed_res[64];
    int nfailed = 0;
    if (self->started) {
        pthread_mutex_lock(&self->mu);
        while (self->nfailed && nfailed < 64) {
            self->nfailed--;
            failed[nfailed] = self->failed[self->nfailed];
            failed_res[nfailed++] = self->failed_res[self->nfailed];
        }
        pthread_mutex_unlock(&self->mu);
    }
    for (int j = 0; j < nfailed; j++) {
        if (reaped(self, out, failed[j], failed_res[j]) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
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
            if (reaped(self, out, (int)ev[j].data, (long long)ev[j].res) < 0) {
                Py_DECREF(out);
                return NULL;
            }
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

static PyMethodDef aio_methods[] = {
    {"submit", (PyCFunction)aio_submit, METH_VARARGS,
     "submit(fd, buf, offset, key): read len(buf) bytes at offset into buf"},
    {"reap", (PyCFunction)aio_reap, METH_VARARGS,
     "reap(clear=True) -> [(key, bytes read or -errno)] of the completed reads;\n"
     "clear=False leaves the eventfd readable (whoever waits on it still wakes)"},
    {"close", (PyCFunction)aio_close, METH_NOARGS, "wait for reads in flight, free"},
    {NULL}
};

static PyGetSetDef aio_getset[] = {
    {"fd", (getter)aio_get_fd, NULL, "the eventfd that becomes readable on completion", NULL},
    {"inflight", (getter)aio_get_inflight, NULL, "reads submitted and not reaped", NULL},
    {NULL}
};

PyTypeObject AIOType = {
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
