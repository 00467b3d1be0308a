//! Compiles the CSI and KMS protocols with protox, so a build needs no `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/csi.proto", "proto/kms.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // RPCs a service does not implement answer UNIMPLEMENTED, as the spec asks.
        .generate_default_stubs(true)
        // Key bytes must never reach a log through a derived Debug.
        .skip_debug(["kms.GetDataKeyResponse", "kms.GetVersionedDataKeyResponse"])
        .compile_fds(descriptors)?;
    Ok(())
}
