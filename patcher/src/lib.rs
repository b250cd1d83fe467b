//! Filled in by the patching issue (see docs/). Intentionally empty until then.
