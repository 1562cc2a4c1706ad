// Python module freezekern._C. Importing it runs the static TORCH_LIBRARY
// registrations of the other translation units; the functions below only
// describe the build for `freezekern env`.
#include <pybind11/pybind11.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

int openmp_max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

bool built_with_cuda() {
#ifdef FREEZEKERN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "freezekern native kernels (registered as torch.ops.freezekern.*)";
  m.def("built_with_openmp", &built_with_openmp, "whether the CPU kernels were compiled with OpenMP");
  m.def("openmp_max_threads", &openmp_max_threads, "omp_get_max_threads() in the calling thread");
  m.def("built_with_cuda", &built_with_cuda, "whether the CUDA kernels were compiled in");
}
