//! The policy document (`--policy`, `ig_config_set_policy_json`) on arbitrary text. What parses
//! is valid, survives a JSON round trip unchanged, and gives a verdict for a
//! real report's modules and for none.
#![no_main]

use intruder_gate::{Policy, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text) else {
        return;
    };
    policy.validate().expect("a parsed policy is valid");
    let json = serde_json::to_string(&policy).expect("a policy serialises");
    let again = Policy::parse(&json).expect("a serialised policy parses");
    assert_eq!(again, policy, "round trip changed the policy: {json}");
    let modules = &intruder_gate_fuzz::sample_report().modules;
    let (verdict, fired) = policy.evaluate(modules);
    // No action is "accept": a verdict other than accept comes from the strictest rule fired.
    let strictest = fired.iter().map(|f| f.rule.action.verdict()).max();
    assert_eq!(strictest.unwrap_or(Verdict::Accept), verdict);
    assert!(
        fired.iter().all(|f| f.value.is_finite()),
        "a fired rule's value is not finite"
    );
    let _ = policy.evaluate::<intruder_gate::report::ModuleReport>(&[]);
});
