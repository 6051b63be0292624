//! candle's backward, ported from candle-core-0.11.1/src/backprop.rs: the order of
//! `sorted_nodes`, the gradient store, and each op's rule with Rust's drop order.

use super::tensor::{ctx, Op, Un, T};
use std::collections::HashMap;

pub(super) fn op_args(op: &Op) -> Vec<&T> {
    match op {
        Op::Add(a, b) | Op::Sub(a, b) | Op::Mul(a, b) | Op::Div(a, b) | Op::Matmul(a, b) => {
            vec![a, b]
        }
        Op::IndexSelect(a, b) | Op::Gather(a, b) => vec![a, b],
        Op::IndexAdd(a, b, c, _) | Op::ScatterAdd(a, b, c) => vec![a, b, c],
        Op::Cat(args, _) => args.iter().collect(),
        Op::Affine(a, mul) => {
            if *mul == 0.0 {
                vec![]
            } else {
                vec![a]
            }
        }
        Op::ToDType(a) => {
            if a.dt().is_float() {
                vec![a]
            } else {
                vec![]
            }
        }
        Op::Unary(a, _)
        | Op::Powf(a, _)
        | Op::Reshape(a)
        | Op::Transpose(a, _, _)
        | Op::Narrow(a, ..)
        | Op::Broadcast(a)
        | Op::Copy(a)
        | Op::Sum(a)
        | Op::Max(a)
        | Op::Cmp(a) => vec![a],
    }
}

/// `Tensor::sorted_nodes`: reverse post-order of the DFS from the loss.
pub(super) fn sorted_nodes(root: &T) -> Vec<T> {
    pub(super) fn walk(node: &T, nodes: &mut Vec<T>, seen: &mut HashMap<u64, bool>) -> bool {
        if let Some(&tg) = seen.get(&node.id()) {
            return tg;
        }
        let mut tg = false;
        if node.0.var {
            tg = true;
        } else if !node.dt().is_float() {
        } else if let Some(op) = &node.0.op {
            for a in op_args(op) {
                tg |= walk(a, nodes, seen);
            }
        }
        seen.insert(node.id(), tg);
        if tg {
            nodes.push(node.clone());
        }
        tg
    }
    let mut nodes = Vec::new();
    let mut seen = HashMap::new();
    walk(root, &mut nodes, &mut seen);
    nodes.reverse();
    nodes
}

pub(super) struct Store {
    pub(super) map: HashMap<u64, T>,
}

impl Store {
    pub(super) fn or_insert(&mut self, t: &T) -> &mut T {
        self.map.entry(t.id()).or_insert_with(|| t.zeros_like())
    }
}

pub(super) fn backward(root: &T) -> Store {
    let nodes = sorted_nodes(root);
    // the Vec<&Tensor> of sorted nodes (capacity doubles from 4)
    let _sorted = ctx()
        .mem
        .alloc(8 * (nodes.len().max(4) as u64).next_power_of_two());
    let mut grads = Store {
        map: HashMap::new(),
    };
    grads.map.insert(root.id(), root.zeros_like().contiguous());
    for node in &nodes {
        if node.0.var {
            continue;
        }
        // backprop.rs binds the removed gradient and then shadows it with its detached copy:
        // the original (and the history it pins) lives until the end of this iteration.
        // Cannot fail: nodes are visited in reverse topological order from the root, so every
        // node's consumers have already added its gradient (the same invariant candle's
        // backprop.rs relies on); the graph is ours, built from shapes, not from user data.
        let grad = grads.map.remove(&node.id()).expect("grad populated");
        let grad = grad.detach();
        let Some(op) = &node.0.op else { continue };
        match op {
            Op::Add(l, r) => {
                let s = grads.or_insert(l);
                *s = s.add(&grad);
                let s = grads.or_insert(r);
                *s = s.add(&grad);
            }
            Op::Sub(l, r) => {
                let s = grads.or_insert(l);
                *s = s.add(&grad);
                let s = grads.or_insert(r);
                *s = s.sub(&grad);
            }
            Op::Mul(l, r) => {
                let lg = grad.mul(r);
                let s = grads.or_insert(l);
                *s = s.add(&lg);
                let rg = grad.mul(l);
                let s = grads.or_insert(r);
                *s = s.add(&rg);
            }
            Op::Div(l, r) => {
                let lg = grad.div(r);
                let s = grads.or_insert(l);
                *s = s.add(&lg);
                let rg = grad.mul(l).div(&r.unary(Un::Sqr));
                let s = grads.or_insert(r);
                *s = s.sub(&rg);
            }
            Op::Matmul(l, r) => {
                let lg = grad.matmul(&r.t());
                let s = grads.or_insert(l);
                *s = s.add(&lg);
                let rg = l.t().matmul(&grad);
                let s = grads.or_insert(r);
                *s = s.add(&rg);
            }
            Op::Reshape(a) => {
                let ag = grad.reshape(a.dims());
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Transpose(a, d1, d2) => {
                let ag = grad.transpose(*d1, *d2);
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Copy(a) => {
                let s = grads.or_insert(a);
                *s = s.add(&grad);
            }
            Op::ToDType(a) => {
                let s = grads.or_insert(a);
                *s = s.add(&grad.to_dtype(a.dt()));
            }
            Op::Affine(a, mul) => {
                let ag = grad.affine(*mul);
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Narrow(a, dim, start, len) => {
                let ad = a.dims();
                let left = if *start == 0 {
                    None
                } else {
                    let mut d = ad.to_vec();
                    d[*dim] = *start;
                    Some(T::zeros(&d, grad.dt()))
                };
                let rp = ad[*dim] - start - len;
                let right = if rp == 0 {
                    None
                } else {
                    let mut d = ad.to_vec();
                    d[*dim] = rp;
                    Some(T::zeros(&d, grad.dt()))
                };
                let ag = match (left, right) {
                    (None, None) => grad.clone(),
                    (Some(l), None) => T::cat(&[&l, &grad], *dim),
                    (None, Some(r)) => T::cat(&[&grad, &r], *dim),
                    (Some(l), Some(r)) => T::cat(&[&l, &grad, &r], *dim),
                };
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Broadcast(a) => {
                let ad = a.dims().to_vec();
                let nd = node.dims();
                let left = nd.len() - ad.len();
                let mut sum_dims: Vec<usize> = (0..left).collect();
                for (i, (n, x)) in nd[left..].iter().zip(ad.iter()).enumerate() {
                    if n != x {
                        sum_dims.push(i + left);
                    }
                }
                let mut ag = grad.sum_keepdim(&sum_dims);
                for _ in 0..left {
                    ag = ag.squeeze(0);
                }
                let s = grads.or_insert(a);
                let sd = s.dims().to_vec();
                *s = s.add(&ag.broadcast_as(&sd));
            }
            Op::Sum(a) => {
                let g = grad.broadcast_as(a.dims());
                let s = grads.or_insert(a);
                *s = s.add(&g);
            }
            Op::Max(a) => {
                let nb = node.broadcast_as(a.dims());
                let g = grad.broadcast_as(a.dims());
                let g = nb.cmp(a).to_dtype(g.dt()).mul(&g);
                let s = grads.or_insert(a);
                let sd = s.dims().to_vec();
                *s = s.add(&g.broadcast_as(&sd));
            }
            Op::Cat(args, dim) => {
                let mut start = 0;
                for a in args {
                    let len = a.dims()[*dim];
                    let ag = grad.narrow(*dim, start, len);
                    let s = grads.or_insert(a);
                    *s = s.add(&ag);
                    start += len;
                }
            }
            Op::IndexSelect(a, ids) => {
                let s = grads.or_insert(a);
                let ids = ids.contiguous();
                *s = s.index_add(&ids, &grad, 0);
            }
            Op::Gather(a, ids) => {
                let s = grads.or_insert(a);
                *s = s.scatter_add(ids, &grad);
            }
            Op::IndexAdd(init, ids, src, dim) => {
                let s = grads.or_insert(init);
                *s = s.add(&grad);
                let sg = grad.index_select(ids, *dim);
                let s = grads.or_insert(src);
                *s = s.add(&sg);
            }
            Op::ScatterAdd(..) | Op::Cmp(_) => {}
            Op::Powf(a, e) => {
                let ag = grad.mul(&a.powf(e - 1.0)).affine(*e);
                let s = grads.or_insert(a);
                *s = s.add(&ag);
            }
            Op::Unary(a, u) => unary_backward(&mut grads, node, a, *u, &grad),
        }
    }
    grads
}

pub(super) fn unary_backward(grads: &mut Store, node: &T, a: &T, u: Un, grad: &T) {
    match u {
        Un::Log => {
            let s = grads.or_insert(a);
            *s = s.add(&grad.div(a));
        }
        Un::Exp => {
            let s = grads.or_insert(a);
            *s = s.add(&grad.mul(node));
        }
        Un::Neg => {
            let s = grads.or_insert(a);
            *s = s.sub(grad);
        }
        Un::Recip => {
            let s = grads.or_insert(a);
            let g = grad.div(&a.unary(Un::Sqr));
            *s = s.sub(&g);
        }
        Un::Sqr => {
            let ag = a.mul(grad).affine(2.0);
            let s = grads.or_insert(a);
            *s = s.add(&ag);
        }
        Un::Sqrt => {
            let ag = grad.div(node).affine(0.5);
            let s = grads.or_insert(a);
            *s = s.add(&ag);
        }
        Un::Tanh => {
            let s = grads.or_insert(a);
            let minus = node.unary(Un::Sqr).affine(1.0);
            *s = s.sub(&grad.mul(&minus));
        }
        Un::Gelu => {
            // backprop.rs: cube, tanh(0.0356774·cube + 0.797885·x), then the derivative.
            let s = grads.or_insert(a);
            let cube = a.powf(3.0);
            let tanh = cube
                .affine(0.0356774)
                .add(&a.affine(0.797885))
                .unary(Un::Tanh);
            let g = tanh
                .affine(0.5)
                .add(
                    &cube
                        .affine(0.0535161)
                        .add(&a.affine(0.398942))
                        .mul(&tanh.powf(2.0).affine(-1.0)),
                )
                .affine(1.0);
            *s = s.add(&grad.mul(&g));
        }
        Un::Silu => {
            let s = grads.or_insert(a);
            let sig = a.unary(Un::Neg).unary(Un::Exp).affine(1.0).unary(Un::Recip);
            let g = sig.mul(&node.affine(-1.0)).add(node);
            *s = s.add(&grad.mul(&g));
        }
    }
}
