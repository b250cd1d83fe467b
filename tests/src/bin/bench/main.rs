//! Benchmarks for `lpvmm run` (see docs/benchmarks.md for figures and how to read them):
//! this file only reads the command line, one subcommand per benchmark, and calls that
//! benchmark's file.
//!
//!   cargo run -p lpvmm-tests --bin bench -- --help         the benchmarks and their arguments
//!   cargo run -p lpvmm-tests --bin bench -- COMMAND [ARGS]
//!
//! Most run lpvmm and a peer (QEMU microvm, or the guest's own livepatch) on the same
//! host with real KVM (nested where needed), side by side, and report medians and
//! ratios: absolute times on nested TCG say little.

mod boot;
mod callback;
mod calls;
mod common;
mod completion;
mod deaths;
mod diff_build;
mod endurance;
mod fork_under_dispatch;
mod guest_diff;
mod host_info;
mod introspect;
mod load;
mod memory;
mod modload;
mod patch;
mod pause;
mod pause_deaths;
mod start;
mod system;
mod ticks;
mod transition;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "lpvmm's benchmarks (docs/benchmarks.md)",
    disable_help_subcommand = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug, PartialEq)]
enum Command {
    /// lpvmm vs QEMU microvm, boot to /init
    Boot {
        #[arg(default_value_t = 5)]
        runs: u32,
    },
    /// The Debian system on lpvmm vs QEMU microvm: boot to multi-user, disk and network
    /// throughput, VMM memory
    System {
        #[arg(default_value_t = 2)]
        runs: u32,
        /// One kernel series [default: both]
        series: Option<String>,
    },
    /// Pause/resume latency with 1, 2, 4 and 8 vCPUs (or VCPUS, e.g. 1,2), seccomp on and off
    Pause {
        #[arg(default_value_t = 1000)]
        cycles: u32,
        /// vCPU counts, comma-separated [default: 1,2,4,8]
        #[arg(value_name = "VCPUS,...")]
        vcpus: Option<String>,
    },
    /// Attach time; pause of `tasks` and of all stacks with 100 / 2000 extra tasks
    Introspect {
        #[arg(default_value_t = 5)]
        runs: u32,
    },
    /// Attach time and its pause against a bare pause (introspect's first table)
    Attach {
        #[arg(default_value_t = 5)]
        runs: u32,
    },
    /// The VMM's resident memory outside guest RAM, before and after attach
    Memory,
    /// The VMM's start to its first KVM_RUN, as lpvmm measures it
    Start {
        #[arg(default_value_t = 5)]
        runs: u32,
    },
    /// Enable/disable pauses; call cost and switch time vs the guest's livepatch
    Patch {
        #[arg(default_value_t = 30)]
        cycles: u32,
    },
    /// A callback in the guest: the pause to queue it against a bare pause, and its
    /// round trip
    Callback {
        #[arg(default_value_t = 10)]
        rounds: u32,
    },
    /// What lpvmm's module notifier costs the guest's insmod/rmmod: no notifier, a
    /// patch for another module, a patch for the loaded module
    Modload {
        #[arg(default_value_t = 20)]
        rounds: u32,
    },
    /// A patch load's pause (first patch, later patch) and the enable's first tick
    /// against a bare pause
    Load {
        #[arg(default_value_t = 3)]
        runs: u32,
    },
    /// Guests the platform kills: lpvmm vs QEMU microvm, same guests, same load
    /// (LPVMM_BENCH_HOST_TRACE=1: the test host's KVM trace of each death)
    Deaths {
        #[arg(default_value_t = 10)]
        runs: u32,
        /// The load [default: busy loops and /proc reads]
        #[arg(value_enum)]
        load: Option<deaths::Load>,
        /// One kernel series [default: both]
        series: Option<String>,
    },
    /// Per-task transitions: completion vs the guest's livepatch (with and without a
    /// 5 s blocker), pause per tick with 100 and 2000 tasks vs a bare pause, call cost
    /// through the trampoline and after
    Transition {
        #[arg(default_value_t = 5)]
        runs: u32,
    },
    /// Whether a guest survives `spawn 2000` with a per-task transition held, and without
    ForkUnderDispatch,
    /// The pause of an immediate enable and of a per-task enable's first tick with extra
    /// tasks, against a bare pause; how many checks were early
    Ticks {
        #[arg(default_value_t = 5)]
        runs: u32,
        /// Extra task counts, comma-separated [default: 100,2000]
        #[arg(value_name = "TASKS,...")]
        tasks: Option<String>,
        /// The guests' memory (`lpvmm run --memory`) [default: 512M]
        memory: Option<String>,
    },
    /// Per-task transition completion vs the guest's livepatch with extra tasks
    Completion {
        #[arg(default_value_t = 5)]
        runs: u32,
        /// Extra task counts, comma-separated [default: 2000]
        #[arg(value_name = "TASKS,...")]
        tasks: Option<String>,
    },
    /// ns per getpid(2) call in the guest: unpatched, through lpvmm's dispatch, after
    /// (direct jump), and the guest's livepatch, interleaved
    Calls {
        #[arg(default_value_t = 5)]
        rounds: u32,
    },
    /// `kp build --diff` of a one-function change: preparing a release (from an empty
    /// cache), then the build, against kbuild compiling the file twice
    DiffBuild {
        #[arg(default_value_t = 5)]
        runs: u32,
        /// The kernel series [default: 6.1]
        series: Option<String>,
    },
    /// The test host's kernel, CPUs and clock source
    HostInfo,
    /// What lpvmm's and QEMU's guests see: CPU flags, KVM features
    GuestDiff {
        /// The kernel series [default: 6.1]
        series: Option<String>,
    },
    /// Enable/disable cycles, per-task and immediate in turn, under 4 readers and 128
    /// getpid hammers that check every result, interleaved with the same load on the
    /// guest's livepatch under QEMU (`alone`: without it)
    Endurance {
        #[arg(default_value_t = 10_000)]
        cycles: u32,
        /// One kernel series (both when none), and/or `alone`
        #[arg(value_name = "SERIES|alone", num_args = 0..=2)]
        rest: Vec<String>,
    },
    /// Guests that die under pause/resume: lpvmm's pause against QEMU's QMP stop/cont,
    /// same load, interleaved
    PauseDeaths {
        #[arg(default_value_t = 10_000)]
        cycles: u32,
        /// One kernel series [default: both]
        series: Option<String>,
    },
}

/// `Some(s)`: that series alone; `None`: both.
fn series_list(series: &Option<String>) -> Vec<&str> {
    match series {
        Some(s) => vec![s.as_str()],
        None => lpvmm_tests::SERIES.to_vec(),
    }
}

/// Run the benchmark `command` names.
fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Boot { runs } => boot::boot(runs),
        Command::System { runs, series } => system::system(runs, &series_list(&series)),
        Command::Pause { cycles, vcpus } => {
            pause::vcpu_counts(vcpus).and_then(|v| pause::pause(cycles, &v))
        }
        Command::Introspect { runs } => introspect::introspect(runs),
        Command::Attach { runs } => introspect::attach_only(runs),
        Command::Memory => memory::vmm_memory(),
        Command::Start { runs } => start::vmm_start(runs),
        Command::Patch { cycles } => patch::patch(cycles),
        Command::Load { runs } => load::load(runs),
        Command::Modload { rounds } => modload::modload(rounds),
        Command::Callback { rounds } => callback::callback(rounds),
        Command::Deaths { runs, load, series } => {
            deaths::deaths(runs, deaths::script(load), &series_list(&series))
        }
        Command::Transition { runs } => transition::transition(runs),
        Command::ForkUnderDispatch => fork_under_dispatch::fork_under_dispatch(),
        Command::Ticks {
            runs,
            tasks,
            memory,
        } => ticks::task_counts(tasks).and_then(|c| ticks::ticks(runs, &c, memory.as_deref())),
        Command::Completion { runs, tasks } => {
            common::counts(tasks, "2000", 0, 10_000, "task count")
                .and_then(|c| completion::completion(runs, &c))
        }
        Command::Calls { rounds } => calls::calls(rounds),
        Command::DiffBuild { runs, series } => {
            diff_build::diff_build(runs, series.as_deref().unwrap_or("6.1"))
        }
        Command::HostInfo => host_info::host_info(),
        Command::GuestDiff { series } => guest_diff::guest_diff(series),
        Command::Endurance { cycles, rest } => {
            let alone = rest.iter().any(|a| a == "alone");
            common::series_or_both(rest.into_iter().find(|a| a != "alone"))
                .and_then(|series| endurance::endurance(cycles, &series, !alone))
        }
        Command::PauseDeaths { cycles, series } => pause_deaths::pause_deaths(cycles, series),
    }
}

fn main() {
    if let Err(e) = run(Cli::parse().command) {
        eprintln!("bench failed: {e}");
        std::process::exit(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(line: &str) -> Command {
        let argv = std::iter::once("bench").chain(line.split_whitespace());
        match Cli::try_parse_from(argv) {
            Ok(cli) => cli.command,
            Err(e) => panic!("`bench {line}` does not parse: {e}"),
        }
    }

    #[test]
    fn the_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    /// Every command line docs/benchmarks.md and docs/testing.md write, as they write it.
    #[test]
    fn documented_command_lines_parse() {
        let documented = [
            "boot 5",
            "system 2",
            "system 1 6.1",
            "pause 1000",
            "pause 1000 1,2",
            "host-info",
            "introspect 5",
            "load 5",
            "modload 20",
            "callback 5",
            "patch 30",
            "calls",
            "calls 5",
            "deaths 12",
            "deaths 20",
            "deaths 6 spawn",
            "deaths 5 spawn",
            "deaths 6 spawn 6.1",
            "deaths 4 hammer",
            "deaths 4 hammer 6.1",
            "pause-deaths",
            "pause-deaths 10000",
            "pause-deaths 10000 6.12",
            "pause-deaths 10000 6.1",
            "endurance",
            "endurance 300",
            "endurance 100",
            "endurance 10000 6.1",
            "endurance 10000 6.12",
            "endurance 10000 6.1 alone",
            "attach 5",
            "memory",
            "start 5",
            "ticks",
            "ticks 2 5000",
            "ticks 3 100,2000",
            "ticks 2 5000 1G",
            "transition",
            "completion",
            "completion 3 2000",
            "fork-under-dispatch",
            "guest-diff",
            "guest-diff 6.1",
        ];
        for line in documented {
            parse(line);
        }
    }

    #[test]
    fn defaults_are_the_old_ones() {
        assert_eq!(parse("boot"), Command::Boot { runs: 5 });
        assert_eq!(
            parse("diff-build"),
            Command::DiffBuild {
                runs: 5,
                series: None
            }
        );
        assert_eq!(
            parse("pause"),
            Command::Pause {
                cycles: 1000,
                vcpus: None
            }
        );
        assert_eq!(parse("introspect"), Command::Introspect { runs: 5 });
        assert_eq!(parse("attach"), Command::Attach { runs: 5 });
        assert_eq!(parse("start"), Command::Start { runs: 5 });
        assert_eq!(parse("patch"), Command::Patch { cycles: 30 });
        assert_eq!(parse("load"), Command::Load { runs: 3 });
        assert_eq!(parse("modload"), Command::Modload { rounds: 20 });
        assert_eq!(parse("callback"), Command::Callback { rounds: 10 });
        assert_eq!(parse("transition"), Command::Transition { runs: 5 });
        assert_eq!(parse("calls"), Command::Calls { rounds: 5 });
        assert_eq!(
            parse("deaths"),
            Command::Deaths {
                runs: 10,
                load: None,
                series: None
            }
        );
        assert_eq!(
            parse("ticks"),
            Command::Ticks {
                runs: 5,
                tasks: None,
                memory: None
            }
        );
        assert_eq!(
            parse("completion"),
            Command::Completion {
                runs: 5,
                tasks: None
            }
        );
        assert_eq!(
            parse("endurance"),
            Command::Endurance {
                cycles: 10_000,
                rest: vec![]
            }
        );
        assert_eq!(
            parse("pause-deaths"),
            Command::PauseDeaths {
                cycles: 10_000,
                series: None
            }
        );
    }

    #[test]
    fn arguments_land_where_they_did() {
        assert_eq!(
            parse("deaths 4 hammer 6.1"),
            Command::Deaths {
                runs: 4,
                load: Some(deaths::Load::Hammer),
                series: Some("6.1".into())
            }
        );
        assert_eq!(
            parse("ticks 2 5000 1G"),
            Command::Ticks {
                runs: 2,
                tasks: Some("5000".into()),
                memory: Some("1G".into())
            }
        );
        assert_eq!(
            parse("endurance 300 alone 6.12"),
            Command::Endurance {
                cycles: 300,
                rest: vec!["alone".into(), "6.12".into()]
            }
        );
        assert_eq!(
            parse("guest-diff 6.12"),
            Command::GuestDiff {
                series: Some("6.12".into())
            }
        );
    }

    #[test]
    fn a_load_deaths_does_not_know_is_refused() {
        let argv = ["bench", "deaths", "3", "fork"];
        assert!(Cli::try_parse_from(argv).is_err());
    }
}
