//! Process hardening at daemon start: no core dumps and no same-uid ptrace or
//! /proc/PID/mem (either would put the secrets in memory within reach), and the open-file
//! limit raised to its hard limit, from which `listen` sizes its connection budget.

use rustix::process::{
    DumpableBehavior, Resource, Rlimit, getrlimit, set_dumpable_behavior, setrlimit,
};
use tracing::{debug, warn};

/// Applies all of it. Nothing here is fatal: where a sandbox refuses a call, it is
/// logged, and the unit's `LimitCORE=0` and `LimitNOFILE=` set the limits from outside.
pub fn process() {
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        warn!(error = %e, "cannot mark the process non-dumpable: a crash may dump its memory");
    }
    no_core_dumps();
    raise_open_files();
}

fn no_core_dumps() {
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if getrlimit(Resource::Core) == none {
        return;
    }
    if let Err(e) = setrlimit(Resource::Core, none) {
        warn!(error = %e, "cannot set the core file size limit to 0 (LimitCORE=0 in the unit sets it)");
    }
}

fn raise_open_files() {
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), Some(maximum)) = (limit.current, limit.maximum) else {
        return;
    };
    if current < maximum {
        let raised = Rlimit {
            current: Some(maximum),
            maximum: Some(maximum),
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => debug!(from = current, to = maximum, "raised the open-file limit"),
            Err(e) => warn!(
                error = %e, limit = current,
                "cannot raise the open-file limit to its hard limit {maximum} (LimitNOFILE= in the unit sets both)"
            ),
        }
    }
}
