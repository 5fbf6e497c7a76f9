//! Building blocks for the allowlists: unconditional syscalls and syscalls allowed only for some argument
//! values, with the union the worker launcher needs.

use std::collections::BTreeMap;

use seccompiler::{
    BackendError, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule,
};

/// Syscall number → `None` (any arguments) or the rules of which at least one must match.
#[derive(Clone, Debug, Default)]
pub struct Allowlist {
    rules: BTreeMap<i64, Option<Vec<SeccompRule>>>,
}

impl Allowlist {
    pub fn new() -> Self {
        Self::default()
    }

    /// Allow `syscalls` with any arguments.
    pub fn allow(&mut self, syscalls: &[libc::c_long]) -> &mut Self {
        for &nr in syscalls {
            self.rules.insert(nr, None);
        }
        self
    }

    /// Allow `syscall` when 32-bit argument `arg` equals one of `values` (an ioctl request, a socket
    /// family). Added to what is already allowed.
    pub fn allow_arg(
        &mut self,
        syscall: libc::c_long,
        arg: u8,
        values: &[u64],
    ) -> Result<&mut Self, BackendError> {
        let mut rules = Vec::with_capacity(values.len());
        for &v in values {
            rules.push(SeccompRule::new(vec![SeccompCondition::new(
                arg,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                v,
            )?])?);
        }
        self.add_rules(syscall, rules);
        Ok(self)
    }

    /// Allow `syscall` when the bits `mask` of argument `arg` equal `value` (e.g. no PROT_EXEC).
    pub fn allow_masked(
        &mut self,
        syscall: libc::c_long,
        arg: u8,
        mask: u64,
        value: u64,
    ) -> Result<&mut Self, BackendError> {
        let rule = SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(mask),
            value,
        )?])?;
        self.add_rules(syscall, vec![rule]);
        Ok(self)
    }

    fn add_rules(&mut self, syscall: libc::c_long, rules: Vec<SeccompRule>) {
        match self
            .rules
            .entry(syscall)
            .or_insert_with(|| Some(Vec::new()))
        {
            // Already allowed with any arguments.
            None => {}
            Some(existing) => existing.extend(rules),
        }
    }

    /// Everything `other` allows is allowed too.
    pub fn union(&mut self, other: &Allowlist) -> &mut Self {
        for (&nr, rules) in &other.rules {
            match rules {
                None => {
                    self.rules.insert(nr, None);
                }
                Some(rules) => self.add_rules(nr, rules.clone()),
            }
        }
        self
    }

    /// Whether `syscall` is allowed for at least some arguments.
    #[cfg(test)]
    pub fn contains(&self, syscall: libc::c_long) -> bool {
        self.rules.contains_key(&syscall)
    }

    /// Whether `syscall` is allowed with any arguments.
    #[cfg(test)]
    pub fn allows_any_args(&self, syscall: libc::c_long) -> bool {
        matches!(self.rules.get(&syscall), Some(None))
    }

    /// The filter: allowed syscalls pass, everything else gets `mismatch`.
    pub fn into_filter(self, mismatch: SeccompAction) -> Result<SeccompFilter, BackendError> {
        let rules = self
            .rules
            .into_iter()
            // seccompiler: an empty rule chain matches any arguments.
            .map(|(nr, rules)| (nr, rules.unwrap_or_default()))
            .collect();
        SeccompFilter::new(rules, mismatch, SeccompAction::Allow, target_arch())
    }
}

pub fn target_arch() -> seccompiler::TargetArch {
    #[cfg(target_arch = "x86_64")]
    {
        seccompiler::TargetArch::x86_64
    }
    #[cfg(target_arch = "aarch64")]
    {
        seccompiler::TargetArch::aarch64
    }
}
