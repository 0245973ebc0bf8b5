// Memory-mapped checkpoint files: mapFile({path, ranges: [[offset, length], ...]}) maps the file once
// and returns one external ArrayBuffer per range, each a window on the same mapping. The mapping is
// private and writable, so a stray write from JavaScript copies the page instead of faulting (and never
// reaches the file). Each ArrayBuffer holds one reference on the mapping; the mapping is unmapped when
// the last of them is finalised by the garbage collector or detached by free() (memory.cpp), whose
// detach releases the backing store and so runs the same finaliser.
#include <cerrno>
#include <cmath>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#if defined(__unix__) || defined(__APPLE__)
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#define MSSM_HAVE_MMAP 1
#else
#define MSSM_HAVE_MMAP 0
#endif

#include "args.h"

namespace mssm::napi {
namespace {

#if MSSM_HAVE_MMAP

struct Mapping {
  void* base;
  size_t size;
  // Finalisers run on the JavaScript thread, one at a time: a plain counter is enough.
  int64_t references;
};

void release(Mapping* mapping) {
  if (--mapping->references > 0) return;
  if (mapping->base) munmap(mapping->base, mapping->size);
  delete mapping;
}

void finalize_range(Napi::Env /*env*/, void* /*data*/, Mapping* mapping) { release(mapping); }

// Closes the descriptor on every path out of MapFile.
struct FileDescriptor {
  int fd = -1;
  ~FileDescriptor() {
    if (fd >= 0) close(fd);
  }
};

std::string quoted(const std::string& path) { return "\"" + path + "\""; }

// An offset or length from JavaScript: a non-negative integer that a double holds exactly.
int64_t range_number(const Args& a, const Napi::Value& v, const std::string& path, size_t index, const char* what) {
  if (!v.IsNumber()) {
    a.fail(quoted(path) + ": range " + std::to_string(index) + " " + what + " must be a number");
  }
  double d = v.As<Napi::Number>().DoubleValue();
  if (!(d >= 0 && d <= 9007199254740991.0) || d != std::floor(d)) {
    a.fail(quoted(path) + ": range " + std::to_string(index) + " " + what + " must be an integer >= 0, got " +
           std::to_string(d));
  }
  return (int64_t)d;
}

Napi::Value MapFile(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Napi::Env env = info.Env();
    Args a(info, "mapFile");
    Napi::Value path_value = a.get("path");
    if (!path_value.IsString()) a.fail("path must be a string");
    std::string path = path_value.As<Napi::String>().Utf8Value();
    Napi::Value ranges_value = a.get("ranges");
    if (!ranges_value.IsArray()) a.fail(quoted(path) + ": ranges must be an array of [offset, length]");
    Napi::Array ranges_array = ranges_value.As<Napi::Array>();

    std::vector<std::pair<int64_t, int64_t>> ranges;
    ranges.reserve(ranges_array.Length());
    for (uint32_t i = 0; i < ranges_array.Length(); ++i) {
      Napi::Value r = ranges_array.Get(i);
      if (!r.IsArray() || r.As<Napi::Array>().Length() != 2) {
        a.fail(quoted(path) + ": range " + std::to_string(i) + " must be an array [offset, length]");
      }
      Napi::Array pair = r.As<Napi::Array>();
      int64_t offset = range_number(a, pair.Get(0u), path, i, "offset");
      int64_t length = range_number(a, pair.Get(1u), path, i, "length");
      ranges.emplace_back(offset, length);
    }

    FileDescriptor file;
    file.fd = open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (file.fd < 0) {
      int err = errno;
      a.fail("cannot open " + quoted(path) + ": " + std::strerror(err));
    }
    struct stat st;
    if (fstat(file.fd, &st) != 0) {
      int err = errno;
      a.fail("cannot stat " + quoted(path) + ": " + std::strerror(err));
    }
    if (!S_ISREG(st.st_mode)) a.fail(quoted(path) + " is not a regular file");
    int64_t file_size = (int64_t)st.st_size;

    for (size_t i = 0; i < ranges.size(); ++i) {
      int64_t offset = ranges[i].first, length = ranges[i].second;
      if (offset > file_size || length > file_size - offset) {
        a.fail(quoted(path) + ": range " + std::to_string(i) + " [" + std::to_string(offset) + ", " +
               std::to_string(offset) + " + " + std::to_string(length) + ") lies beyond the end of the file (" +
               std::to_string(file_size) + " bytes)");
      }
    }

    // The constructing call holds one reference of its own, so an exception half-way through (each
    // ArrayBuffer already made holds its own) cannot unmap too early or leak the mapping.
    Mapping* mapping = new Mapping{nullptr, (size_t)file_size, 1};
    struct Guard {
      Mapping* mapping;
      ~Guard() { release(mapping); }
    } guard{mapping};

    if (file_size > 0) {
      void* base = mmap(nullptr, (size_t)file_size, PROT_READ | PROT_WRITE, MAP_PRIVATE, file.fd, 0);
      if (base == MAP_FAILED) {
        int err = errno;
        a.fail("cannot map " + quoted(path) + " (" + std::to_string(file_size) + " bytes): " + std::strerror(err));
      }
      mapping->base = base;
      // Loading reads every weight soon after; ask the kernel to start reading ahead now.
      madvise(base, (size_t)file_size, MADV_WILLNEED);
    }

    Napi::Array result = Napi::Array::New(env, ranges.size());
    for (size_t i = 0; i < ranges.size(); ++i) {
      int64_t offset = ranges[i].first, length = ranges[i].second;
      if (length == 0) {
        // An empty window needs no mapping (and an empty external buffer may be refused).
        result.Set((uint32_t)i, Napi::ArrayBuffer::New(env, 0));
        continue;
      }
      char* data = static_cast<char*>(mapping->base) + offset;
      ++mapping->references;
      Napi::ArrayBuffer buffer;
      try {
        buffer = Napi::ArrayBuffer::New(env, data, (size_t)length, finalize_range, mapping);
      } catch (...) {
        --mapping->references;
        throw;
      }
      result.Set((uint32_t)i, buffer);
    }
    return result;
  });
}

#else

Napi::Value MapFile(const Napi::CallbackInfo& info) {
  return guarded(info, [&]() -> Napi::Value {
    Args(info, "mapFile").fail("memory-mapped files are not supported on this platform");
  });
}

#endif

}  // namespace

void register_mapfile(Napi::Env env, Napi::Object exports) {
  exports.Set("mapFile", Napi::Function::New(env, MapFile, "mapFile"));
}

}  // namespace mssm::napi
