//! Process hardening at daemon start: no core dumps and no same-uid ptrace or
//! /proc/PID/mem (either would put the secrets in memory within reach), and the open-file
//! limit raised to its hard limit, from which `listen` sizes its connection budget.

use rustix::process::{
    DumpableBehavior, Resource, Rlimit, getrlimit, set_dumpable_behavior, setrlimit,
};

/// Applies all of it, before the config (and its secrets) is read. Nothing here is fatal:
/// where a sandbox refuses a call, the returned warnings say so (logged once logging is
/// set up), and the unit's `LimitCORE=0` and `LimitNOFILE=` set the limits from outside.
#[must_use = "the warnings say what could not be applied"]
pub fn process() -> Vec<String> {
    let mut warnings = Vec::new();
    if let Err(e) = set_dumpable_behavior(DumpableBehavior::NotDumpable) {
        warnings.push(format!(
            "cannot mark the process non-dumpable ({e}): a crash may dump its memory"
        ));
    }
    warnings.extend(no_core_dumps());
    warnings.extend(raise_open_files());
    warnings
}

fn no_core_dumps() -> Option<String> {
    let none = Rlimit {
        current: Some(0),
        maximum: Some(0),
    };
    if getrlimit(Resource::Core) == none {
        return None;
    }
    setrlimit(Resource::Core, none).err().map(|e| {
        format!("cannot set the core file size limit to 0 ({e}); LimitCORE=0 in the unit sets it")
    })
}

fn raise_open_files() -> Option<String> {
    let limit = getrlimit(Resource::Nofile);
    let (Some(current), Some(maximum)) = (limit.current, limit.maximum) else {
        return None;
    };
    if current >= maximum {
        return None;
    }
    let raised = Rlimit {
        current: Some(maximum),
        maximum: Some(maximum),
    };
    setrlimit(Resource::Nofile, raised).err().map(|e| {
        format!(
            "cannot raise the open-file limit from {current} to its hard limit {maximum} ({e}); LimitNOFILE= in the unit sets both"
        )
    })
}
