// A C interface over libtorch's AOTInductor package loader
// (torch::inductor::AOTIModelPackageLoader), for src/model/aoti.rs.
//
// Tensors cross as tch's handles (heap-allocated at::Tensor, freed by tch). No C++ exception
// crosses the boundary: each one becomes an error message, returned as a malloc'd string that
// the caller frees with tch_serve_aoti_free_string.

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

namespace {

char* copy_string(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

void set_error(char** err, const char* what) {
  if (err != nullptr) {
    *err = copy_string(what == nullptr ? "unknown error" : what);
  }
}

// "key\tvalue\n" lines, sorted by nothing in particular.
char* metadata_lines(const std::unordered_map<std::string, std::string>& meta) {
  std::string out;
  for (const auto& kv : meta) {
    out += kv.first;
    out += '\t';
    out += kv.second;
    out += '\n';
  }
  return copy_string(out);
}

}  // namespace

extern "C" {

using Loader = torch::inductor::AOTIModelPackageLoader;

// The metadata the package was compiled with (AOTI_DEVICE_KEY, ...), read without loading it.
char* tch_serve_aoti_package_metadata(const char* path, char** err) {
  try {
    return metadata_lines(Loader::load_metadata_from_package(path, "model"));
  } catch (const c10::Error& e) {
    set_error(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, e.what());
  } catch (...) {
    set_error(err, nullptr);
  }
  return nullptr;
}

// Loads the package at `path` (its model named "model") with one runner. `device_index` is the
// CUDA device for a CUDA package, -1 otherwise.
void* tch_serve_aoti_load(const char* path, int device_index, char** err) {
  try {
    return new Loader(path, "model", false, 1, static_cast<c10::DeviceIndex>(device_index));
  } catch (const c10::Error& e) {
    set_error(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, e.what());
  } catch (...) {
    set_error(err, nullptr);
  }
  return nullptr;
}

// Runs the model on `n_inputs` tensors. Writes at most `capacity` new tensor handles to
// `outputs` and their count to `n_outputs`. Returns 0, or -1 with `err` set.
int tch_serve_aoti_run(void* loader, at::Tensor** inputs, size_t n_inputs, at::Tensor** outputs,
                       size_t capacity, size_t* n_outputs, char** err) {
  try {
    std::vector<at::Tensor> in;
    in.reserve(n_inputs);
    for (size_t i = 0; i < n_inputs; ++i) {
      in.push_back(*inputs[i]);
    }
    std::vector<at::Tensor> out = static_cast<Loader*>(loader)->run(in);
    if (out.size() > capacity) {
      set_error(err, ("the model returned " + std::to_string(out.size()) + " outputs, expected at most " +
                      std::to_string(capacity))
                         .c_str());
      return -1;
    }
    for (size_t i = 0; i < out.size(); ++i) {
      outputs[i] = new at::Tensor(std::move(out[i]));
    }
    *n_outputs = out.size();
    return 0;
  } catch (const c10::Error& e) {
    set_error(err, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(err, e.what());
  } catch (...) {
    set_error(err, nullptr);
  }
  return -1;
}

void tch_serve_aoti_free(void* loader) { delete static_cast<Loader*>(loader); }

void tch_serve_aoti_free_string(char* s) { std::free(s); }

}  // extern "C"
