// The checkpoint target links libtorch: bake the project's libtorch folder into its run path,
// as worker/build.rs does for the worker (LIBTORCH comes from .cargo/config.toml).
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_CHECKPOINT").is_some() {
        if let Ok(libtorch) = std::env::var("LIBTORCH") {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{libtorch}/lib");
        }
    }
}
