//! x86_64 specifics: boot protocols, vCPU registers, CPUID and the MP table.

pub mod boot;
pub mod cpuid;
pub mod mptable;
pub mod regs;
