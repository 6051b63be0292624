//! Chinchilla scaling (Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models").
//!
//! Approach 3's fitted loss `L(N, D) = E + A / N^α + B / D^β` (§3.3, eq. 10), minimised subject
//! to the training budget `C ≈ 6·N·D` (Kaplan et al. 2020), gives in closed form (eq. 4)
//! `N_opt = G·(C/6)^a`, `D_opt = G⁻¹·(C/6)^b` with `a = β/(α+β)`, `b = α/(α+β)` and
//! `G = (αA / (βB))^(1/(α+β))`. The 20-tokens-per-parameter rule of thumb (the paper's Table 3:
//! about 20 tokens per parameter at every budget) is shown beside it.

use serde::Serialize;

/// Irreducible loss E (Hoffmann et al. 2022, eq. 10).
pub const CHINCHILLA_E: f64 = 1.69;
/// Parameter term coefficient A (eq. 10).
pub const CHINCHILLA_A: f64 = 406.4;
/// Data term coefficient B (eq. 10).
pub const CHINCHILLA_B: f64 = 410.7;
/// Parameter exponent α (eq. 10).
pub const CHINCHILLA_ALPHA: f64 = 0.34;
/// Data exponent β (eq. 10).
pub const CHINCHILLA_BETA: f64 = 0.28;
/// Training FLOPs per parameter per token, `C ≈ 6·N·D` (Kaplan et al. 2020, §2.1).
pub const FLOPS_PER_PARAM_TOKEN: f64 = 6.0;
/// Compute-optimal tokens per parameter, the rule of thumb read off Hoffmann et al. 2022 Table 3.
pub const TOKENS_PER_PARAM: f64 = 20.0;

/// The fitted law.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Law {
    pub e: f64,
    pub a: f64,
    pub b: f64,
    pub alpha: f64,
    pub beta: f64,
}

/// Hoffmann et al. 2022, approach 3.
pub const CHINCHILLA: Law = Law {
    e: CHINCHILLA_E,
    a: CHINCHILLA_A,
    b: CHINCHILLA_B,
    alpha: CHINCHILLA_ALPHA,
    beta: CHINCHILLA_BETA,
};

impl Law {
    /// Predicted loss (nats/token) of N parameters trained on D tokens.
    pub fn loss(&self, n: f64, d: f64) -> f64 {
        self.e + self.a / n.powf(self.alpha) + self.b / d.powf(self.beta)
    }
    /// Exponent of N_opt in C: `β/(α+β)`.
    pub fn exp_n(&self) -> f64 {
        self.beta / (self.alpha + self.beta)
    }
    /// Exponent of D_opt in C: `α/(α+β)`.
    pub fn exp_d(&self) -> f64 {
        self.alpha / (self.alpha + self.beta)
    }
    /// `G = (αA / (βB))^(1/(α+β))`.
    pub fn g(&self) -> f64 {
        ((self.alpha * self.a) / (self.beta * self.b)).powf(1.0 / (self.alpha + self.beta))
    }
    /// Compute-optimal (N, D) for a budget of C FLOPs.
    pub fn optimal(&self, c: f64) -> (f64, f64) {
        let x = c / FLOPS_PER_PARAM_TOKEN;
        (
            self.g() * x.powf(self.exp_n()),
            x.powf(self.exp_d()) / self.g(),
        )
    }
    /// The budget for which N is compute-optimal: invert `N = G·(C/6)^a`.
    pub fn budget_for(&self, n: f64) -> f64 {
        FLOPS_PER_PARAM_TOKEN * (n / self.g()).powf(1.0 / self.exp_n())
    }
}

/// One (N, D) plan with its cost and predicted loss.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Plan {
    pub params: f64,
    pub tokens: f64,
    /// 6·N·D.
    pub flops: f64,
    pub tokens_per_param: f64,
    /// L(N, D), nats per token.
    pub loss: f64,
}

fn plan(law: &Law, n: f64, d: f64) -> Plan {
    Plan {
        params: n,
        tokens: d,
        flops: FLOPS_PER_PARAM_TOKEN * n * d,
        tokens_per_param: d / n,
        loss: law.loss(n, d),
    }
}

/// For a FLOP budget: the fitted optimum and the 20-tokens rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BudgetPlan {
    pub flops: f64,
    pub chinchilla: Plan,
    /// `D = 20·N` at the same budget: `N = sqrt(C / 120)`.
    pub rule_20: Plan,
}

pub fn for_budget(law: &Law, c: f64) -> BudgetPlan {
    let (n, d) = law.optimal(c);
    let n20 = (c / (FLOPS_PER_PARAM_TOKEN * TOKENS_PER_PARAM)).sqrt();
    BudgetPlan {
        flops: c,
        chinchilla: plan(law, n, d),
        rule_20: plan(law, n20, TOKENS_PER_PARAM * n20),
    }
}

/// For a given model size: the data that makes it compute-optimal, and the 20-tokens rule.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ModelPlan {
    pub chinchilla: Plan,
    pub rule_20: Plan,
}

pub fn for_model(law: &Law, n: f64) -> ModelPlan {
    let c = law.budget_for(n);
    let (_, d) = law.optimal(c);
    ModelPlan {
        chinchilla: plan(law, n, d),
        rule_20: plan(law, n, TOKENS_PER_PARAM * n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, rel: f64) -> bool {
        ((a - b) / b).abs() < rel
    }

    /// Hand-computed: G = (0.34·406.4 / (0.28·410.7))^(1/0.62) = (138.176 / 114.996)^1.6129…
    /// = 1.20157^1.6129 = 1.3447; a = 0.28/0.62 = 0.45161, b = 0.54839.
    #[test]
    fn closed_form_constants() {
        let l = CHINCHILLA;
        assert!(close(l.g(), 1.3447, 1e-4), "{}", l.g());
        assert!(close(l.exp_n(), 0.451_613, 1e-5));
        assert!(close(l.exp_d(), 0.548_387, 1e-5));
    }

    /// Chinchilla's own budget, 5.76e23 FLOPs (the paper's §4): C/6 = 9.6e22,
    /// N_opt = 1.3447 · 9.6e22^0.451613 = 3.22e10, D_opt = 9.6e22 / N_opt = 2.98e12 — approach 3
    /// puts fewer parameters and more tokens than the 70B/1.4T Chinchilla was given (the
    /// paper's Table 3 shows approach 3 favouring smaller models than approaches 1 and 2).
    #[test]
    fn chinchilla_budget() {
        let p = for_budget(&CHINCHILLA, 5.76e23);
        assert!(
            close(p.chinchilla.params, 3.22e10, 5e-3),
            "{}",
            p.chinchilla.params
        );
        assert!(close(p.chinchilla.flops, 5.76e23, 1e-12));
        assert!(close(
            p.chinchilla.tokens,
            9.6e22 / p.chinchilla.params,
            1e-12
        ));
        // 20 tokens/param: N = sqrt(5.76e23 / 120) = 6.928e10, D = 1.386e12
        assert!(close(p.rule_20.params, 6.928_203e10, 1e-6));
        assert!(close(p.rule_20.tokens, 1.385_641e12, 1e-6));
        // L(70e9, 1.4e12) = 1.69 + 406.4/70e9^0.34 + 410.7/1.4e12^0.28 = 1.9366 (hand)
        assert!(close(CHINCHILLA.loss(70e9, 1.4e12), 1.9366, 1e-4));
    }

    /// The optimum is a minimum of L along 6ND = C.
    #[test]
    fn optimum_minimises_loss_on_the_budget() {
        let c = 1e21;
        let (n, d) = CHINCHILLA.optimal(c);
        let l0 = CHINCHILLA.loss(n, d);
        for f in [0.8, 0.95, 1.05, 1.25] {
            assert!(CHINCHILLA.loss(n * f, d / f) > l0);
        }
        // budget_for inverts optimal
        assert!(close(CHINCHILLA.budget_for(n), c, 1e-9));
        let m = for_model(&CHINCHILLA, n);
        assert!(close(m.chinchilla.tokens, d, 1e-9));
        assert_eq!(m.rule_20.tokens, 20.0 * n);
    }
}
