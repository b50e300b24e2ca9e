#include <pybind11/pybind11.h>
PYBIND11_MODULE(_volume, m) { m.attr("__version__") = MEDSEEK_VERSION; }
