//! Link-time settings for libtorch.
//!
//! torch-sys names `torch_cuda` on the link line when the libtorch it builds against has CUDA,
//! but the linker's `--as-needed` drops it again because no symbol of it is referenced: CUDA
//! would then be silently unavailable at run time. Force it in with `--no-as-needed`, and record
//! an rpath to libtorch so development builds run without LD_LIBRARY_PATH.
//!
//! It compiles the C++ bridge to libtorch's AOTInductor package loader (src/model/aoti_bridge.cpp)
//! against the headers of the same libtorch, with the C++ ABI torch-sys builds with.
//!
//! It also compiles the Open Inference Protocol's gRPC service (proto/grpc_predict_v2.proto)
//! into Rust, with protox (a protobuf compiler in Rust: no system protoc needed).

use std::path::Path;

fn main() {
    compile_protos();
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let lib = Path::new(&lib);
    compile_aoti_bridge(lib);
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        if lib.join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
            println!("cargo:rustc-cfg=tch_serve_cuda");
        }
        // An AOTInductor package's library names libtorch.so, which nothing else here
        // references: load it with the binary so that the package's dlopen finds it loaded.
        if lib.join("libtorch.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch,--as-needed");
        }
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    println!("cargo:rustc-check-cfg=cfg(tch_serve_cuda)");
    // The version of the libtorch being linked, for the build-info metric.
    let version = lib
        .parent()
        .map(|torch| torch.join("version.py"))
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("__version__"))
                .and_then(|l| l.split('\'').nth(1))
                .map(|v| v.split('+').next().unwrap_or(v).to_string())
        })
        .or_else(|| {
            lib.parent()
                .map(|root| root.join("build-version"))
                .and_then(|p| std::fs::read_to_string(p).ok())
                .map(|v| v.trim().split('+').next().unwrap_or("").to_string())
        });
    if let Some(v) = version {
        println!("cargo:rustc-env=TCH_SERVE_LIBTORCH_VERSION={v}");
    }
}

fn compile_aoti_bridge(lib: &Path) {
    const BRIDGE: &str = "src/model/aoti_bridge.cpp";
    println!("cargo:rerun-if-changed={BRIDGE}");
    if !Path::new(BRIDGE).exists() {
        // The container build compiles the dependencies from the manifests alone, without the
        // sources (and without anything that would call the bridge).
        return;
    }
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let root = lib.parent().unwrap_or(lib);
    // torch-sys's default too: every libtorch of the pinned version uses the C++11 ABI.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".into());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(root.join("include"))
        .include(root.join("include/torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file(BRIDGE)
        .compile("tch_serve_aoti");
}

fn compile_protos() {
    const PROTO: &str = "proto/grpc_predict_v2.proto";
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = match protox::compile([PROTO], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => panic!("compiling {PROTO}: {e}"),
    };
    if let Err(e) = tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)
    {
        panic!("generating the gRPC code of {PROTO}: {e}");
    }
}
