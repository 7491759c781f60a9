// Generates the message types and tonic services from proto/switchyard/v1/*.proto (needs `protoc`:
// `apt-get install protobuf-compiler libprotobuf-dev`, which .ci/run does).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    tonic_prost_build::configure().compile_protos(&["proto/switchyard/v1/switchyard.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
