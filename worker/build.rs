// Bakes the project's libtorch folder into the binaries' run path, so that `worker` runs
// without LD_LIBRARY_PATH after scripts/bootstrap.sh. LD_LIBRARY_PATH still wins over
// RUNPATH, which is how a GPU host points the same binary at its own PyTorch install.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
    }
}
