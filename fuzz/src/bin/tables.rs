//! AFL++ target `tables`: see [`lpvmm_fuzz::tables`].
fn main() {
    lpvmm_fuzz::init();
    afl::fuzz!(|data: &[u8]| lpvmm_fuzz::tables(data));
}
