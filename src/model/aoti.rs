//! AOTInductor packages (`.pt2`, from `torch._inductor.aoti_compile_and_package`): loaded
//! through libtorch's `AOTIModelPackageLoader` by the small C++ bridge in `aoti_bridge.cpp`,
//! compiled by `build.rs` against the same libtorch headers that tch builds with.
//!
//! A package is a zip holding a shared library compiled for one device and one torch version;
//! loading it extracts and opens that library. Every C++ exception becomes an error here.

use std::collections::HashMap;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;

use anyhow::{Context, anyhow, bail};
use tch::Tensor;
use torch_sys::C_tensor;

unsafe extern "C" {
    fn tch_serve_aoti_package_metadata(path: *const c_char, err: *mut *mut c_char) -> *mut c_char;
    fn tch_serve_aoti_load(
        path: *const c_char,
        device_index: c_int,
        err: *mut *mut c_char,
    ) -> *mut c_void;
    fn tch_serve_aoti_run(
        loader: *mut c_void,
        inputs: *const *mut C_tensor,
        n_inputs: usize,
        outputs: *mut *mut C_tensor,
        capacity: usize,
        n_outputs: *mut usize,
        err: *mut *mut c_char,
    ) -> c_int;
    fn tch_serve_aoti_free(loader: *mut c_void);
    fn tch_serve_aoti_free_string(s: *mut c_char);
}

/// Takes ownership of a string the bridge allocated.
fn take_string(s: *mut c_char) -> String {
    if s.is_null() {
        return String::new();
    }
    // SAFETY: the bridge returns NUL-terminated strings from malloc, freed once here.
    let out = unsafe { CStr::from_ptr(s) }.to_string_lossy().into_owned();
    unsafe { tch_serve_aoti_free_string(s) };
    out
}

fn c_path(path: &Path) -> anyhow::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .with_context(|| format!("{}: a path with a NUL byte", path.display()))
}

/// The metadata AOTInductor recorded in the package (`AOTI_DEVICE_KEY`: `cpu` or `cuda`, ...),
/// read without opening its library.
pub fn package_metadata(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    let p = c_path(path)?;
    let mut err = std::ptr::null_mut();
    // SAFETY: `p` outlives the call; the bridge catches every exception.
    let lines = unsafe { tch_serve_aoti_package_metadata(p.as_ptr(), &mut err) };
    if lines.is_null() {
        bail!(
            "{}: not a readable AOTInductor package: {}",
            path.display(),
            take_string(err)
        );
    }
    Ok(take_string(lines)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect())
}

/// Where libtorch's loader unpacks a package (a `mkdtemp` under this fixed path; `TMPDIR` is not
/// read), and loads its shared library from.
const UNPACK_DIR: &str = "/tmp";

/// Whether the file system at `dir` forbids executing (and so mapping) its files.
fn mounted_noexec(dir: &Path) -> bool {
    let Ok(c) = c_path(dir) else { return false };
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is a NUL-terminated path and `st` a buffer of the right type.
    let rc = unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) };
    // SAFETY: statvfs filled it when it returned 0.
    rc == 0 && unsafe { st.assume_init() }.f_flag & libc::ST_NOEXEC != 0
}

/// A loaded AOTInductor package. Runs on one thread at a time (the worker that owns it).
pub struct AotiModel {
    loader: *mut c_void,
}

// SAFETY: the loader is used by one thread at a time (it is owned, and `run` takes `&mut self`);
// libtorch's loader has no thread affinity.
unsafe impl Send for AotiModel {}

impl AotiModel {
    /// Opens the package at `path`. `cuda_device` is the device index for a CUDA package.
    pub fn load(path: &Path, cuda_device: Option<usize>) -> anyhow::Result<Self> {
        let p = c_path(path)?;
        let index = cuda_device.map_or(-1, |d| d as c_int);
        let mut err = std::ptr::null_mut();
        // SAFETY: as above.
        let loader = unsafe { tch_serve_aoti_load(p.as_ptr(), index, &mut err) };
        if loader.is_null() {
            let cause = take_string(err);
            if mounted_noexec(Path::new(UNPACK_DIR)) {
                bail!(
                    "loading AOTInductor package {}: {UNPACK_DIR} is mounted noexec, and libtorch \
                     unpacks the package's library there and cannot load it from such a mount: \
                     mount {UNPACK_DIR} with exec (docker run --tmpfs /tmp:exec, compose \
                     `tmpfs: [/tmp:exec]`) ({cause})",
                    path.display(),
                );
            }
            bail!("loading AOTInductor package {}: {cause}", path.display());
        }
        Ok(Self { loader })
    }

    /// Runs the model on `inputs`, returning its outputs.
    pub fn run(&mut self, inputs: &[&Tensor]) -> anyhow::Result<Vec<Tensor>> {
        const CAPACITY: usize = 8;
        let handles: Vec<*mut C_tensor> =
            inputs.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        let mut outputs = [std::ptr::null_mut::<C_tensor>(); CAPACITY];
        let mut n = 0usize;
        let mut err = std::ptr::null_mut();
        // SAFETY: the handles are live tensors borrowed for the call (the bridge copies the
        // at::Tensor references, it does not take them); the outputs are new handles we own.
        let rc = unsafe {
            tch_serve_aoti_run(
                self.loader,
                handles.as_ptr(),
                handles.len(),
                outputs.as_mut_ptr(),
                CAPACITY,
                &mut n,
                &mut err,
            )
        };
        if rc != 0 {
            return Err(anyhow!("AOTInductor run: {}", take_string(err)));
        }
        // SAFETY: the first `n` entries are tensors allocated by the bridge, owned from here on.
        Ok(outputs[..n]
            .iter()
            .map(|&t| unsafe { Tensor::from_ptr(t) })
            .collect())
    }
}

impl Drop for AotiModel {
    fn drop(&mut self) {
        // SAFETY: created by tch_serve_aoti_load, freed once.
        unsafe { tch_serve_aoti_free(self.loader) };
    }
}
