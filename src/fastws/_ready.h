/* An awaitable that is already done, with a value: what recv() and ``async for`` return when a
 * message is queued.  Awaiting it hands the value back through am_send (Python 3.10+), so the
 * common case costs one small object -- no coroutine, no future, no StopIteration.  (A Cython
 * async def would cost a coroutine, its await wrapper and three deallocations per message.)
 * Old-style iteration (tp_iternext, for callers that do not use am_send) raises StopIteration. */
#ifndef FASTWS_READY_H
#define FASTWS_READY_H

#include <Python.h>

typedef struct {
    PyObject_HEAD
    PyObject *value; /* NULL once handed out */
} fastws_ReadyValue;

static void fastws_ready_dealloc(PyObject *self) {
    Py_XDECREF(((fastws_ReadyValue *)self)->value);
    PyObject_Free(self);
}

static PyObject *fastws_ready_await(PyObject *self) {
    Py_INCREF(self); /* it is its own iterator */
    return self;
}

static PySendResult fastws_ready_send(PyObject *self, PyObject *arg, PyObject **result) {
    fastws_ReadyValue *ready = (fastws_ReadyValue *)self;
    (void)arg;
    *result = ready->value ? ready->value : Py_NewRef(Py_None); /* the reference passes on */
    ready->value = NULL;
    return PYGEN_RETURN;
}

static PyObject *fastws_ready_next(PyObject *self) {
    fastws_ReadyValue *ready = (fastws_ReadyValue *)self;
    PyObject *value = ready->value ? ready->value : Py_NewRef(Py_None);
    PyObject *stop;
    ready->value = NULL;
    stop = PyObject_CallOneArg(PyExc_StopIteration, value); /* an instance: a tuple value stays whole */
    Py_DECREF(value);
    if (stop != NULL) {
        PyErr_SetObject(PyExc_StopIteration, stop);
        Py_DECREF(stop);
    }
    return NULL;
}

/* The generator-style methods, for code that drives awaitables by hand: send(x) is next(); an
 * exception thrown in is raised (it never suspends, so nothing is waiting to take it). */
static PyObject *fastws_ready_send_method(PyObject *self, PyObject *arg) {
    (void)arg;
    return fastws_ready_next(self);
}

static PyObject *fastws_ready_throw(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *exc;
    (void)self;
    if (nargs < 1 || nargs > 3) {
        PyErr_SetString(PyExc_TypeError, "throw expected 1 to 3 arguments");
        return NULL;
    }
    exc = args[0];
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else if (PyExceptionClass_Check(exc))
        PyErr_SetObject(exc, nargs > 1 ? args[1] : NULL);
    else
        PyErr_SetString(PyExc_TypeError, "exceptions must be classes or instances deriving from BaseException");
    return NULL;
}

static PyObject *fastws_ready_close(PyObject *self, PyObject *unused) {
    (void)unused;
    Py_CLEAR(((fastws_ReadyValue *)self)->value);
    Py_RETURN_NONE;
}

static PyMethodDef fastws_ready_methods[] = {
    {"send", (PyCFunction)fastws_ready_send_method, METH_O, "send(value): the awaitable's result, as StopIteration."},
    {"throw", (PyCFunction)(void (*)(void))fastws_ready_throw, METH_FASTCALL, "throw(exc): raise exc."},
    {"close", (PyCFunction)fastws_ready_close, METH_NOARGS, "close(): drop the value."},
    {NULL, NULL, 0, NULL},
};

static PyAsyncMethods fastws_ready_async = {
    .am_await = fastws_ready_await,
    .am_send = fastws_ready_send,
};

static PyTypeObject fastws_ReadyValueType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "fastws._frame.ReadyValue",
    .tp_basicsize = sizeof(fastws_ReadyValue),
    .tp_dealloc = fastws_ready_dealloc,
    .tp_as_async = &fastws_ready_async,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "An already finished awaitable with a value (a queued message).",
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = fastws_ready_next,
    .tp_methods = fastws_ready_methods,
};

/* -1 with an exception if the type could not be readied (module initialisation). */
static int fastws_ready_init(void) { return PyType_Ready(&fastws_ReadyValueType); }

/* A new ReadyValue for ``value`` (a new reference), or NULL with an exception. */
static PyObject *fastws_ready_value(PyObject *value) {
    fastws_ReadyValue *ready = PyObject_New(fastws_ReadyValue, &fastws_ReadyValueType);
    if (ready == NULL) return NULL;
    Py_INCREF(value);
    ready->value = value;
    return (PyObject *)ready;
}

#endif
