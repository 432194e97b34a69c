// How the op library reports bad arguments. The stable ABI has no
// TORCH_CHECK_VALUE / TORCH_CHECK_TYPE (STD_TORCH_CHECK raises RuntimeError), so
// errors.cpp throws exceptions that torch's Python binding (pybind11) turns into
// ValueError and TypeError; a caller from C++ sees std::runtime_error subclasses.
// Messages name the argument, the value given and what is allowed.
#pragma once
#include <sstream>
#include <string>

namespace amp_engine {

[[noreturn]] void throw_value_error(const std::string& msg);  // Python ValueError
[[noreturn]] void throw_type_error(const std::string& msg);   // Python TypeError

namespace detail {
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace amp_engine

#define AMP_CHECK_VALUE(cond, ...)                                                    \
  do {                                                                                \
    if (!(cond)) ::amp_engine::throw_value_error(::amp_engine::detail::concat(__VA_ARGS__)); \
  } while (0)

#define AMP_CHECK_TYPE(cond, ...)                                                    \
  do {                                                                               \
    if (!(cond)) ::amp_engine::throw_type_error(::amp_engine::detail::concat(__VA_ARGS__)); \
  } while (0)
