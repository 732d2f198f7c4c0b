//! Generates the tonic code for trainer.v1 with the vendored protoc, so that no system
//! protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // Build scripts run single-threaded, and prost-build reads PROTOC from the environment.
    std::env::set_var("PROTOC", protoc);
    println!("cargo:rerun-if-changed=trainer/v1/trainer.proto");
    tonic_prost_build::configure().compile_protos(&["trainer/v1/trainer.proto"], &["."])?;
    Ok(())
}
