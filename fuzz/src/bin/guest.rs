//! AFL++ target `guest`: see [`lpvmm_fuzz::guest`].
fn main() {
    lpvmm_fuzz::init();
    afl::fuzz!(|data: &[u8]| lpvmm_fuzz::guest(data));
}
