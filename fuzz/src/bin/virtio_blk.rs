//! AFL++ target `virtio_blk`: see [`lpvmm_fuzz::virtio_blk`].
fn main() {
    afl::fuzz!(|data: &[u8]| lpvmm_fuzz::virtio_blk(data));
}
