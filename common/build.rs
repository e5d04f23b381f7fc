//! Generates the node feed's gRPC service (client and server) from the Rust message types
//! in `src/feed.rs`: tonic's manual builder needs no `.proto` file and no `protoc`.

fn main() {
    let watch = tonic_build::manual::Method::builder()
        .name("watch")
        .route_name("Watch")
        .input_type("crate::feed::WatchNode")
        .output_type("crate::feed::NodeUpdate")
        .codec_path("tonic_prost::ProstCodec")
        .server_streaming()
        .build();
    let service = tonic_build::manual::Service::builder()
        .name("NodeFeed")
        .package("podiam.v1")
        .comment("The pods of one node, their decisions and credentials: a snapshot, then changes.")
        .method(watch)
        .build();
    tonic_build::manual::Builder::new()
        .build_transport(false)
        .compile(&[service]);
    println!("cargo:rerun-if-changed=build.rs");
}
