//! AFL++ target `kp`: see [`lpvmm_fuzz::kp`].
fn main() {
    lpvmm_fuzz::init();
    afl::fuzz!(|data: &[u8]| lpvmm_fuzz::kp(data));
}
