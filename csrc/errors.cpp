// ValueError and TypeError from a stable-ABI kernel (see errors.h).
//
// torch.ops calls run through pybind11, which maps std::invalid_argument to
// ValueError (a documented standard-exception translation) and, for any
// pybind11::builtin_exception, lets the exception set the Python error itself.
// There is no standard exception that becomes TypeError, so TypeErrorException
// derives from a declaration of pybind11::builtin_exception (std::runtime_error
// plus the pure virtual set_error(); unchanged in pybind11 since 2.2, and it
// matches the class torch's binding catches by its exported type name). If a
// future binding stopped recognising it, the error would still surface, as a
// RuntimeError with the same message. Verified on torch 2.11 and 2.14.1.
#include <Python.h>

#include <stdexcept>
#include <string>

#include "errors.h"

namespace pybind11 {
class __attribute__((visibility("default"))) builtin_exception : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
  virtual void set_error() const = 0;
};
}  // namespace pybind11

namespace amp_engine {
namespace {
class TypeErrorException final : public pybind11::builtin_exception {
 public:
  using builtin_exception::builtin_exception;
  // Called by pybind11 with the GIL held, when the error reaches Python.
  void set_error() const override { PyErr_SetString(PyExc_TypeError, what()); }
};
}  // namespace

void throw_value_error(const std::string& msg) { throw std::invalid_argument(msg); }

void throw_type_error(const std::string& msg) { throw TypeErrorException(msg); }

}  // namespace amp_engine
