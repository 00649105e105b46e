/* memfs._fast's parts (see _fast.c): what one source file offers another. */
#ifndef MEMFS_FAST_H
#define MEMFS_FAST_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* _fast_aio.c: Linux native AIO reads signalled on an eventfd */
extern PyTypeObject AIOType;

/* _fast_pages.c: pages in memory: read buffers, checks, copies */
extern PyTypeObject BufferType;
PyObject *fast_scatter(PyObject *module, PyObject *args);
PyObject *fast_pool(PyObject *module, PyObject *args);
PyObject *fast_has_xxh3(PyObject *module, PyObject *unused);
PyObject *fast_verify(PyObject *module, PyObject *args);
PyObject *fast_span(PyObject *module, PyObject *args);

#endif
