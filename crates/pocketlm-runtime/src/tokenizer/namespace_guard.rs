//! Keeps a chat template from building a cyclic value out of `namespace()` objects.
//!
//! A namespace is the one mutable value in minijinja. A template that stores a namespace inside
//! itself (`{% set ns.x = [ns] %}`, found by fuzzing) makes a cycle, and rendering, comparing
//! or serializing that value recurses until the stack overflows, which no error or fuel limit
//! catches. Real chat templates only read and write a namespace's attributes and hand it to
//! their own macros, so this check refuses any other use before the template compiles:
//!
//! - `namespace(...)` may only be called as the whole right side of `{% set NAME = ... %}`
//!   (inside a macro with a parameter called `namespace`, that name is the parameter);
//! - a "namespace name" (one so assigned, or a macro parameter that is passed one) may only
//!   appear as the object of a lookup (`ns.x`, `ns['x']`, `ns.items()`), as the target of
//!   `{% set ns.x = ... %}`, under a test (`ns is defined`, a bool), or as a named parameter's
//!   argument of a macro defined in the template (macros return strings).
//!
//! Then, by induction, no value stored anywhere holds a namespace: no cycle can form.
//! Names are not scoped, so a namespace name reused for something else is refused too; none of
//! the 70 templates in llama.cpp's `models/templates` is.

use minijinja::machinery::ast::{Call, CallArg, Expr, Macro, Stmt};
use minijinja::machinery::parse;
use minijinja::syntax::SyntaxConfig;

/// Deeper than any real template; keeps these walks' own recursion bounded (a chain of binary
/// operators nests the tree one level per operator).
const MAX_AST_DEPTH: usize = 1000;

/// `Ok` when the template uses namespaces only as described in the module docs, or does not
/// parse (minijinja then reports its own syntax error).
pub(super) fn check_namespace_use(
    source: &str,
    name: &str,
    syntax: SyntaxConfig,
) -> Result<(), String> {
    let Ok(root) = parse(source, name, syntax) else {
        return Ok(());
    };
    let mut facts = Facts::default();
    visit(&root, 0, &mut |node| match node {
        Node::Stmt(Stmt::Set(set)) if namespace_call(&set.expr).is_some() => {
            if let Expr::Var(target) = &set.target {
                facts.names.push(target.id);
            }
        }
        Node::Stmt(Stmt::Macro(m)) => facts.macros.push(m),
        Node::Call(call) => facts.calls.push(call),
        _ => {}
    })?;
    // A macro parameter that some call passes a namespace name is one too, transitively.
    loop {
        let mut added = false;
        for call in &facts.calls {
            for (arg, param) in facts.macro_arguments(call) {
                if let (Expr::Var(v), Some(param)) = (arg, param)
                    && facts.names.contains(&v.id)
                    && !facts.names.contains(&param)
                {
                    facts.names.push(param);
                    added = true;
                }
            }
        }
        if !added {
            break;
        }
    }
    let guard = Guard { facts: &facts };
    guard.stmt(&root, false, 0)
}

fn too_deep() -> String {
    format!("chat template expressions nest more than {MAX_AST_DEPTH} levels")
}

/// The call when `expr` is `namespace(...)`.
fn namespace_call<'t, 'a>(expr: &'t Expr<'a>) -> Option<&'t Call<'a>> {
    match expr {
        Expr::Call(call) if matches!(&call.expr, Expr::Var(v) if v.id == "namespace") => Some(call),
        _ => None,
    }
}

/// The call of a call block or a `do` statement.
fn stmt_call<'t, 'a>(stmt: &'t Stmt<'a>) -> Option<&'t Call<'a>> {
    match stmt {
        Stmt::CallBlock(c) => Some(&c.call),
        Stmt::Do(d) => Some(&d.call),
        _ => None,
    }
}

#[derive(Default)]
struct Facts<'t, 'a> {
    /// Namespace names (see the module docs).
    names: Vec<&'a str>,
    macros: Vec<&'t Macro<'a>>,
    calls: Vec<&'t Call<'a>>,
}

impl<'t, 'a> Facts<'t, 'a> {
    /// Each argument of `call` with the parameter it binds when the callee is a macro of
    /// this template and the argument lands in a named parameter (not `varargs`/`kwargs`).
    fn macro_arguments<'c>(&self, call: &'c Call<'a>) -> Vec<(&'c Expr<'a>, Option<&'a str>)> {
        let params: Option<Vec<&'a str>> = match &call.expr {
            // A name defined twice could be either macro: no parameter is known then.
            Expr::Var(callee) => match self.macros.iter().filter(|m| m.name == callee.id).count() {
                1 => self.macros.iter().find(|m| m.name == callee.id),
                _ => None,
            }
            .map(|m| {
                m.args
                    .iter()
                    .filter_map(|a| match a {
                        Expr::Var(v) => Some(v.id),
                        _ => None,
                    })
                    .collect()
            }),
            _ => None,
        };
        call.args
            .iter()
            .enumerate()
            .map(|(i, arg)| match arg {
                CallArg::Pos(e) => (e, params.as_ref().and_then(|p| p.get(i).copied())),
                CallArg::Kwarg(k, e) => (
                    e,
                    params
                        .as_ref()
                        .and_then(|p| p.iter().find(|name| *name == k).copied()),
                ),
                CallArg::PosSplat(e) | CallArg::KwargSplat(e) => (e, None),
            })
            .collect()
    }
}

enum Node<'t, 'a> {
    Stmt(&'t Stmt<'a>),
    Call(&'t Call<'a>),
}

/// Calls `f` on every statement and every call (including a call block's and a `do`'s).
fn visit<'t, 'a>(
    stmt: &'t Stmt<'a>,
    depth: usize,
    f: &mut impl FnMut(Node<'t, 'a>),
) -> Result<(), String> {
    if depth > MAX_AST_DEPTH {
        return Err(too_deep());
    }
    f(Node::Stmt(stmt));
    let (exprs, bodies) = stmt_parts(stmt);
    for e in exprs {
        visit_expr(e, depth + 1, f)?;
    }
    if let Some(call) = stmt_call(stmt) {
        visit_call(call, depth + 1, f)?;
    }
    for body in bodies {
        for s in body {
            visit(s, depth + 1, f)?;
        }
    }
    Ok(())
}

fn visit_call<'t, 'a>(
    call: &'t Call<'a>,
    depth: usize,
    f: &mut impl FnMut(Node<'t, 'a>),
) -> Result<(), String> {
    f(Node::Call(call));
    visit_expr(&call.expr, depth + 1, f)?;
    for arg in &call.args {
        visit_expr(arg_expr(arg), depth + 1, f)?;
    }
    Ok(())
}

fn visit_expr<'t, 'a>(
    expr: &'t Expr<'a>,
    depth: usize,
    f: &mut impl FnMut(Node<'t, 'a>),
) -> Result<(), String> {
    if depth > MAX_AST_DEPTH {
        return Err(too_deep());
    }
    if let Expr::Call(call) = expr {
        return visit_call(call, depth, f);
    }
    for child in expr_children(expr) {
        visit_expr(child, depth + 1, f)?;
    }
    Ok(())
}

fn arg_expr<'t, 'a>(arg: &'t CallArg<'a>) -> &'t Expr<'a> {
    match arg {
        CallArg::Pos(e) | CallArg::Kwarg(_, e) | CallArg::PosSplat(e) | CallArg::KwargSplat(e) => e,
    }
}

/// A statement's expressions (assignment targets and macro parameter lists left out) and
/// bodies. Call blocks and `do` keep their call out: callers see it as a `Call`.
fn stmt_parts<'t, 'a>(stmt: &'t Stmt<'a>) -> (Vec<&'t Expr<'a>>, Vec<&'t [Stmt<'a>]>) {
    match stmt {
        Stmt::Template(t) => (vec![], vec![&t.children]),
        Stmt::EmitExpr(e) => (vec![&e.expr], vec![]),
        Stmt::EmitRaw(_) | Stmt::Continue(_) | Stmt::Break(_) | Stmt::Do(_) => (vec![], vec![]),
        Stmt::ForLoop(f) => {
            let mut exprs = vec![&f.iter];
            exprs.extend(&f.filter_expr);
            (exprs, vec![&f.body, &f.else_body])
        }
        Stmt::IfCond(i) => (vec![&i.expr], vec![&i.true_body, &i.false_body]),
        Stmt::WithBlock(w) => (
            w.assignments.iter().map(|(_, v)| v).collect(),
            vec![&w.body],
        ),
        Stmt::Set(s) => (vec![&s.expr], vec![]),
        Stmt::SetBlock(s) => (s.filter.iter().collect(), vec![&s.body]),
        Stmt::AutoEscape(a) => (vec![&a.enabled], vec![&a.body]),
        Stmt::FilterBlock(f) => (vec![&f.filter], vec![&f.body]),
        Stmt::Macro(m) => (m.defaults.iter().collect(), vec![&m.body]),
        Stmt::CallBlock(c) => (
            c.macro_decl.defaults.iter().collect(),
            vec![&c.macro_decl.body],
        ),
    }
}

fn expr_children<'t, 'a>(expr: &'t Expr<'a>) -> Vec<&'t Expr<'a>> {
    match expr {
        Expr::Var(_) | Expr::Const(_) => vec![],
        Expr::Slice(s) => {
            let mut v = vec![&s.expr];
            v.extend([&s.start, &s.stop, &s.step].into_iter().flatten());
            v
        }
        Expr::UnaryOp(u) => vec![&u.expr],
        Expr::BinOp(b) => vec![&b.left, &b.right],
        Expr::Compare(c) => std::iter::once(&c.expr)
            .chain(c.ops.iter().map(|op| &op.expr))
            .collect(),
        Expr::IfExpr(i) => {
            let mut v = vec![&i.test_expr, &i.true_expr];
            v.extend(&i.false_expr);
            v
        }
        Expr::Filter(f) => f.expr.iter().chain(f.args.iter().map(arg_expr)).collect(),
        Expr::Test(t) => std::iter::once(&t.expr)
            .chain(t.args.iter().map(arg_expr))
            .collect(),
        Expr::GetAttr(a) => vec![&a.expr],
        Expr::GetItem(i) => vec![&i.expr, &i.subscript_expr],
        Expr::Call(c) => std::iter::once(&c.expr)
            .chain(c.args.iter().map(arg_expr))
            .collect(),
        Expr::List(l) => l.items.iter().collect(),
        Expr::Tuple(t) => t.items.iter().collect(),
        Expr::Map(m) => m.keys.iter().chain(&m.values).collect(),
    }
}

struct Guard<'f, 't, 'a> {
    facts: &'f Facts<'t, 'a>,
}

impl Guard<'_, '_, '_> {
    /// `shadowed`: inside a macro with a parameter called `namespace`.
    fn stmt(&self, stmt: &Stmt, shadowed: bool, depth: usize) -> Result<(), String> {
        if depth > MAX_AST_DEPTH {
            return Err(too_deep());
        }
        let (exprs, bodies) = stmt_parts(stmt);
        let inner_shadowed = match stmt {
            Stmt::Macro(m) => declares_namespace(&m.args),
            Stmt::CallBlock(c) => declares_namespace(&c.macro_decl.args),
            _ => shadowed,
        };
        // `{% set NAME = namespace(...) %}`: only the constructor's arguments need a look.
        let construction = match stmt {
            Stmt::Set(set) if !shadowed && matches!(set.target, Expr::Var(_)) => {
                namespace_call(&set.expr)
            }
            _ => None,
        };
        if let Some(call) = construction {
            self.args(call, shadowed, depth)?;
        } else {
            match stmt {
                Stmt::Set(set) => self.target(&set.target, shadowed, depth)?,
                Stmt::SetBlock(set) => self.target(&set.target, shadowed, depth)?,
                _ => {}
            }
            for e in exprs {
                self.expr(e, shadowed, depth + 1)?;
            }
            if let Some(call) = stmt_call(stmt) {
                self.call(call, shadowed, depth + 1)?;
            }
        }
        for body in bodies {
            for s in body {
                self.stmt(s, inner_shadowed, depth + 1)?;
            }
        }
        Ok(())
    }

    /// An assignment target: plain names and tuples of them bind; `ns.x` writes an attribute
    /// of whatever `ns` is (minijinja refuses it unless that is a namespace).
    fn target(&self, target: &Expr, shadowed: bool, depth: usize) -> Result<(), String> {
        match target {
            Expr::Var(_) => Ok(()),
            Expr::Tuple(t) => t
                .items
                .iter()
                .try_for_each(|i| self.target(i, shadowed, depth + 1)),
            Expr::GetAttr(a) => self.lookup_object(&a.expr, shadowed, depth + 1),
            other => self.expr(other, shadowed, depth + 1),
        }
    }

    /// The object of `x.attr`, `x[i]`, `x.method()` or `x is test`: a namespace may stand here.
    fn lookup_object(&self, object: &Expr, shadowed: bool, depth: usize) -> Result<(), String> {
        match object {
            Expr::Var(_) => Ok(()),
            other => self.expr(other, shadowed, depth),
        }
    }

    fn args(&self, call: &Call, shadowed: bool, depth: usize) -> Result<(), String> {
        for (arg, param) in self.facts.macro_arguments(call) {
            match (arg, param) {
                // Bound to a parameter that is itself a namespace name, and so checked. The
                // namespace function itself may not be handed over.
                (Expr::Var(v), Some(_)) if v.id != "namespace" || shadowed => {}
                _ => self.expr(arg, shadowed, depth + 1)?,
            }
        }
        Ok(())
    }

    fn call(&self, call: &Call, shadowed: bool, depth: usize) -> Result<(), String> {
        if let Expr::Var(v) = &call.expr
            && v.id == "namespace"
            && !shadowed
        {
            return Err(format!(
                "line {}: `namespace(...)` may only be the whole right side of \
                 `{{% set NAME = namespace(...) %}}`",
                v.span().start_line
            ));
        }
        self.lookup_object(&call.expr, shadowed, depth + 1)?;
        self.args(call, shadowed, depth)
    }

    fn expr(&self, expr: &Expr, shadowed: bool, depth: usize) -> Result<(), String> {
        if depth > MAX_AST_DEPTH {
            return Err(too_deep());
        }
        let d = depth + 1;
        match expr {
            Expr::Var(v) if v.id == "namespace" && !shadowed => Err(format!(
                "line {}: `namespace` may only be called as `{{% set NAME = namespace(...) %}}`",
                v.span().start_line
            )),
            Expr::Var(v) if self.facts.names.contains(&v.id) => Err(format!(
                "line {}: namespace `{}` may only be used as `{1}.attr`, `{1}['key']` or a \
                 macro's argument (storing or passing a namespace itself could make a cyclic \
                 value)",
                v.span().start_line,
                v.id
            )),
            Expr::Call(c) => self.call(c, shadowed, d),
            Expr::GetAttr(a) => self.lookup_object(&a.expr, shadowed, d),
            Expr::GetItem(i) => {
                self.lookup_object(&i.expr, shadowed, d)?;
                self.expr(&i.subscript_expr, shadowed, d)
            }
            Expr::Test(t) => {
                self.lookup_object(&t.expr, shadowed, d)?;
                t.args
                    .iter()
                    .try_for_each(|a| self.expr(arg_expr(a), shadowed, d))
            }
            other => expr_children(other)
                .into_iter()
                .try_for_each(|child| self.expr(child, shadowed, d)),
        }
    }
}

fn declares_namespace(params: &[Expr]) -> bool {
    params
        .iter()
        .any(|p| matches!(p, Expr::Var(v) if v.id == "namespace"))
}
