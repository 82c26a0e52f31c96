//! Builds the `rdma` transport's C layer over rdma-core when the feature `rdma` is on (see
//! `src/transport/rdma/shim.c` for why it is C). Without the feature: nothing.

fn main() {
    println!("cargo:rerun-if-changed=src/transport/rdma/shim.c");
    #[cfg(feature = "rdma")]
    {
        cc::Build::new()
            .file("src/transport/rdma/shim.c")
            .warnings(true)
            .extra_warnings(true)
            .warnings_into_errors(true)
            .compile("fastmig_rdma_shim");
        println!("cargo:rustc-link-lib=ibverbs");
        println!("cargo:rustc-link-lib=rdmacm");
    }
}
