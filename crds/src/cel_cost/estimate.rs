//! The worst-case cost of one CEL rule, computed as cel-go's static estimator does
//! (`checker/cost.go`, `coster`) with the sizes the API server gives it (`Decl`).
//!
//! Only the upper bound is tracked: the API server compares `CostEstimate.Max` with its
//! limits and ignores the lower bound. Where Kubernetes versions price a shape differently,
//! the more expensive pricing is used (see [`Size::of_presence_test`]).

use std::rc::Rc;

use cel::common::ast::{
    CallExpr, ComprehensionExpr, EntryExpr, Expr, IdedExpr, LiteralValue, SelectExpr,
};

use super::decl::{Decl, Kind};
use super::thousands;

/// cel-go's `common.StringTraversalCostFactor`: a string comparison or copy costs 0.1 per byte.
const STRING_TRAVERSAL: f64 = 0.1;
/// cel-go's `common.RegexStringLengthCostFactor`: each regex character is guessed to be a quarter
/// of a regex term.
const REGEX_LENGTH: f64 = 0.25;
/// cel-go's `common.ListCreateBaseCost`.
const LIST_CREATE: u64 = 10;
/// cel-go's `common.MapCreateBaseCost`.
const MAP_CREATE: u64 = 30;

/// Why a rule cannot be estimated: the API server would refuse it as well, or it uses
/// something this estimator does not price yet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EstimateError {
    /// The rule is not CEL.
    #[error("does not parse as CEL: {0}")]
    Parse(String),
    /// The rule names a variable the API server does not declare.
    #[error(
        "unknown variable `{0}`: a CRD rule has `self`, `oldSelf` and the variables of its own macros"
    )]
    UnknownVariable(String),
    /// The rule selects a field the schema node does not have.
    #[error("`{field}` is not a field of `{at}` (the API server would refuse the rule)")]
    UnknownField {
        /// The field selected.
        field: String,
        /// The schema node it was selected from.
        at: String,
    },
    /// The rule uses a function or expression this estimator has no pricing for.
    #[error(
        "the estimator does not price `{0}`: add its cost from cel-go's checker/cost.go (or Kubernetes' library cost.go) to crds/src/cel_cost/estimate.rs before using it in a rule"
    )]
    Unsupported(String),
}

/// A rule's estimated cost and what makes it expensive or risky.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Estimate {
    /// The worst-case cost of one evaluation, in CEL cost units.
    pub cost: u64,
    /// Shapes the rule should not have, each explained (empty when none).
    pub findings: Vec<String>,
}

/// Estimates `rule` attached to a schema node declared as `root` (`self` and `oldSelf`).
pub(crate) fn estimate(rule: &str, root: Rc<Decl>) -> Result<Estimate, EstimateError> {
    let ast = cel::parser::Parser::new()
        .parse(rule)
        .map_err(|e| EstimateError::Parse(e.to_string()))?;
    let mut coster = Coster {
        root,
        locals: Vec::new(),
        findings: Vec::new(),
    };
    let node = coster.cost(&ast)?;
    let mut findings = coster.findings;
    findings.dedup();
    Ok(Estimate {
        cost: node.cost,
        findings,
    })
}

/// The type of an expression, as far as pricing needs it.
#[derive(Debug, Clone)]
enum Ty {
    /// A value declared by the schema.
    Schema(Rc<Decl>),
    Bool,
    Int,
    Uint,
    Double,
    String,
    Bytes,
    Null,
    List(Box<Ty>),
    Map(Box<Ty>),
    Dyn,
}

impl Ty {
    fn kind(&self) -> Kind {
        match self {
            Ty::Schema(decl) => decl.kind,
            Ty::Bool => Kind::Bool,
            Ty::Int | Ty::Uint => Kind::Int,
            Ty::Double => Kind::Double,
            Ty::String => Kind::String,
            Ty::Bytes => Kind::Bytes,
            // `null` compares like a scalar of size 1.
            Ty::Null => Kind::Bool,
            Ty::List(_) => Kind::List,
            Ty::Map(_) => Kind::Map,
            Ty::Dyn => Kind::Dyn,
        }
    }

    /// cel-go's `isScalar`: a value of constant size (1).
    fn is_scalar(&self) -> bool {
        matches!(
            self.kind(),
            Kind::Bool | Kind::Int | Kind::Double | Kind::Duration | Kind::Timestamp
        )
    }

    /// Strings and bytes, and `dyn` priced as the worse of its possibilities (a string).
    fn is_text(&self) -> bool {
        matches!(self.kind(), Kind::String | Kind::Bytes | Kind::Dyn)
    }

    /// The items of a list, the values of a map.
    fn elem(&self) -> (Ty, Option<Rc<Decl>>) {
        match self {
            Ty::Schema(decl) => match &decl.elem {
                Some(elem) => (Ty::Schema(elem.clone()), Some(elem.clone())),
                None => (Ty::Dyn, None),
            },
            Ty::List(elem) | Ty::Map(elem) => ((**elem).clone(), None),
            _ => (Ty::Dyn, None),
        }
    }
}

/// An upper bound of a value's size, and what makes it large when the schema does not
/// bound it.
#[derive(Debug, Clone)]
struct Size {
    max: u64,
    /// Why the size is the estimator's fallback rather than a schema limit.
    unbounded: Option<String>,
}

impl Size {
    fn exact(n: u64) -> Size {
        Size {
            max: n,
            unbounded: None,
        }
    }

    /// A size the estimator cannot know: cel-go's `UnknownSizeEstimate` (2^64 - 1).
    fn unknown(why: &str) -> Size {
        Size {
            max: u64::MAX,
            unbounded: Some(why.to_string()),
        }
    }

    /// The size of a `has()` result. cel-go gives every scalar size 1 today, but Kubernetes
    /// 1.24's estimator gives a presence test no size at all, so an `==` or `!=` between
    /// presence tests is priced as unbounded there and the CRD is refused (measured on a
    /// v1.24.0 API server: `has(self.a) != has(self.b)` is refused over budget by more than
    /// 100x even with every string bounded). The more expensive pricing wins.
    fn of_presence_test() -> Size {
        // The shape is reported on its own, with the rewrite (`check_equality`).
        Size {
            max: u64::MAX,
            unbounded: None,
        }
    }

    fn of_decl(decl: &Decl) -> Size {
        Size {
            max: decl.max_elements,
            unbounded: (!decl.bounded).then(|| {
                format!(
                    "`{}`, {} (priced at {} {}): give it {}",
                    decl.path,
                    decl.unbounded_what(),
                    thousands(decl.max_elements),
                    decl.unit(),
                    decl.limit_keyword()
                )
            }),
        }
    }

    fn union(self, other: Size) -> Size {
        if other.max > self.max { other } else { self }
    }

    fn add(self, other: Size) -> Size {
        Size {
            max: self.max.saturating_add(other.max),
            unbounded: self.unbounded.or(other.unbounded),
        }
    }
}

/// One priced expression.
#[derive(Debug, Clone)]
struct Node {
    cost: u64,
    ty: Ty,
    /// The schema node the expression's field path leads to (cel-go's `Path()`, resolved the
    /// way the API server's `EstimateSize` resolves it).
    decl: Option<Rc<Decl>>,
    /// A size known from the expression itself: a literal, or a call's result size.
    size: Option<Size>,
    /// Whether this is a `has()` presence test.
    presence_test: bool,
}

impl Node {
    fn value(cost: u64, ty: Ty) -> Node {
        Node {
            cost,
            ty,
            decl: None,
            size: None,
            presence_test: false,
        }
    }

    fn sized(mut self, size: Size) -> Node {
        self.size = Some(size);
        self
    }

    /// cel-go's `computeSize`, falling back to `UnknownSizeEstimate`: the computed or literal
    /// size, else the schema's (the API server's `EstimateSize`), else 1 for a scalar.
    fn size(&self) -> Size {
        if let Some(size) = &self.size {
            return size.clone();
        }
        if let Some(decl) = &self.decl {
            return Size::of_decl(decl);
        }
        if self.presence_test {
            return Size::of_presence_test();
        }
        if self.ty.is_scalar() {
            return Size::exact(1);
        }
        Size::unknown(
            "a computed value of unknown size (priced as 2^64 - 1): compare schema fields or literals instead",
        )
    }
}

/// A variable a macro introduced.
struct Local {
    name: String,
    ty: Ty,
    decl: Option<Rc<Decl>>,
    size: Option<Size>,
}

struct Coster {
    root: Rc<Decl>,
    locals: Vec<Local>,
    findings: Vec<String>,
}

impl Coster {
    fn cost(&mut self, e: &IdedExpr) -> Result<Node, EstimateError> {
        match &e.expr {
            Expr::Literal(literal) => Ok(literal_node(literal)),
            Expr::Ident(name) => self.ident(name),
            Expr::Select(select) => self.select(select),
            Expr::Call(call) => self.call(call),
            Expr::List(list) => {
                let mut cost = LIST_CREATE;
                let mut elem = Ty::Dyn;
                for (i, item) in list.elements.iter().enumerate() {
                    let node = self.cost(item)?;
                    cost = cost.saturating_add(node.cost);
                    if i == 0 {
                        elem = node.ty;
                    }
                }
                Ok(Node::value(cost, Ty::List(Box::new(elem)))
                    .sized(Size::exact(list.elements.len() as u64)))
            }
            Expr::Map(map) => {
                let mut cost = MAP_CREATE;
                for entry in &map.entries {
                    let EntryExpr::MapEntry(entry) = &entry.expr else {
                        return Err(EstimateError::Unsupported("a struct literal".into()));
                    };
                    cost = cost
                        .saturating_add(self.cost(&entry.key)?.cost)
                        .saturating_add(self.cost(&entry.value)?.cost);
                }
                Ok(Node::value(cost, Ty::Map(Box::new(Ty::Dyn)))
                    .sized(Size::exact(map.entries.len() as u64)))
            }
            Expr::Comprehension(comprehension) => self.comprehension(comprehension),
            Expr::Struct(_) => Err(EstimateError::Unsupported("a struct literal".into())),
            Expr::Unspecified => Err(EstimateError::Unsupported("an empty expression".into())),
        }
    }

    /// cel-go's `costIdent`: 1.
    fn ident(&mut self, name: &str) -> Result<Node, EstimateError> {
        if let Some(local) = self.locals.iter().rev().find(|l| l.name == name) {
            return Ok(Node {
                cost: 1,
                ty: local.ty.clone(),
                decl: local.decl.clone(),
                size: local.size.clone(),
                presence_test: false,
            });
        }
        match name {
            "self" | "oldSelf" => Ok(Node {
                decl: Some(self.root.clone()),
                ..Node::value(1, Ty::Schema(self.root.clone()))
            }),
            _ => Err(EstimateError::UnknownVariable(name.to_string())),
        }
    }

    /// cel-go's `costSelect`: the operand, plus 1 for a field of an object or map; a presence
    /// test costs 1 plus its operand.
    fn select(&mut self, select: &SelectExpr) -> Result<Node, EstimateError> {
        let operand = self.cost(&select.operand)?;
        let (ty, decl) = self.field(&operand, &select.field)?;
        if select.test {
            return Ok(Node {
                presence_test: true,
                ..Node::value(operand.cost.saturating_add(1), Ty::Bool)
            });
        }
        let selects_from_aggregate =
            matches!(operand.ty.kind(), Kind::Object | Kind::Map | Kind::Dyn);
        Ok(Node {
            decl,
            ..Node::value(
                operand
                    .cost
                    .saturating_add(u64::from(selects_from_aggregate)),
                ty,
            )
        })
    }

    /// The type of `operand.field`, and its schema node when the API server's `EstimateSize`
    /// can follow the path there (through object fields; not through a map's values).
    fn field(&self, operand: &Node, field: &str) -> Result<(Ty, Option<Rc<Decl>>), EstimateError> {
        match (&operand.ty, operand.ty.kind()) {
            (Ty::Schema(decl), Kind::Object) => match decl.fields.get(field) {
                Some(child) => {
                    let path = operand.decl.as_ref().map(|_| child.clone());
                    Ok((Ty::Schema(child.clone()), path))
                }
                None => Err(EstimateError::UnknownField {
                    field: field.to_string(),
                    at: if decl.path.is_empty() {
                        "self".to_string()
                    } else {
                        decl.path.clone()
                    },
                }),
            },
            (_, Kind::Map) => Ok((operand.ty.elem().0, None)),
            (_, Kind::Dyn) => Ok((Ty::Dyn, None)),
            _ => Err(EstimateError::Unsupported(format!(
                "selecting `{field}` from a value that is not an object or map"
            ))),
        }
    }

    fn call(&mut self, call: &CallExpr) -> Result<Node, EstimateError> {
        let target = match &call.target {
            Some(target) => Some(self.cost(target)?),
            None => None,
        };
        let mut args = Vec::with_capacity(call.args.len());
        for arg in &call.args {
            args.push(self.cost(arg)?);
        }
        let arg_sum = args
            .iter()
            .chain(target.iter())
            .fold(0u64, |sum, a| sum.saturating_add(a.cost));
        let name = call.func_name.as_str();
        let node = match (name, target.as_ref(), args.as_slice()) {
            ("_&&_" | "_||_", None, [lhs, rhs]) => {
                Node::value(lhs.cost.saturating_add(rhs.cost), Ty::Bool)
            }
            ("_?_:_", None, [condition, if_true, if_false]) => Node::value(
                condition
                    .cost
                    .saturating_add(if_true.cost.max(if_false.cost)),
                if_true.ty.clone(),
            )
            .sized(if_true.size().union(if_false.size())),
            ("_==_" | "_!=_", None, [lhs, rhs]) => {
                self.check_equality(name, lhs, rhs);
                Node::value(self.comparison(lhs, rhs).saturating_add(arg_sum), Ty::Bool)
            }
            ("_<_" | "_<=_" | "_>_" | "_>=_", None, [lhs, rhs]) => {
                let cost = if lhs.ty.is_text() || rhs.ty.is_text() {
                    self.comparison(lhs, rhs)
                } else {
                    1
                };
                Node::value(cost.saturating_add(arg_sum), Ty::Bool)
            }
            ("_+_", None, [lhs, rhs]) => {
                let size = lhs.size().add(rhs.size());
                if lhs.ty.is_text() {
                    let cost = self.traverse(&size, "joins strings");
                    Node::value(cost.saturating_add(arg_sum), lhs.ty.clone()).sized(size)
                } else if lhs.ty.kind() == Kind::List {
                    Node::value(1u64.saturating_add(arg_sum), lhs.ty.clone()).sized(size)
                } else {
                    Node::value(1u64.saturating_add(arg_sum), lhs.ty.clone())
                }
            }
            ("_-_" | "_*_" | "_/_" | "_%_", None, [lhs, _]) => {
                Node::value(1u64.saturating_add(arg_sum), lhs.ty.clone())
            }
            ("-_", None, [operand]) => {
                Node::value(1u64.saturating_add(arg_sum), operand.ty.clone())
            }
            ("!_" | "@not_strictly_false", None, [_]) => {
                Node::value(1u64.saturating_add(arg_sum), Ty::Bool)
            }
            ("_[_]", None, [container, _]) => {
                let (ty, decl) = container.ty.elem();
                Node {
                    decl: container.decl.as_ref().and(decl),
                    ..Node::value(1u64.saturating_add(arg_sum), ty)
                }
            }
            ("@in", None, [_, container]) => {
                let cost = if container.ty.kind() == Kind::Map {
                    1
                } else {
                    let size = container.size();
                    self.charge(&size, "searches");
                    size.max
                };
                Node::value(cost.saturating_add(arg_sum), Ty::Bool)
            }
            ("size", Some(_), []) | ("size", None, [_]) => {
                Node::value(1u64.saturating_add(arg_sum), Ty::Int)
            }
            ("startsWith" | "endsWith", Some(_), [prefix]) => {
                let cost = self.traverse(&prefix.size(), "compares");
                Node::value(cost.saturating_add(arg_sum), Ty::Bool)
            }
            ("contains", Some(text), [part]) => {
                let cost = self
                    .traverse(&text.size(), "searches")
                    .saturating_mul(self.traverse(&part.size(), "searches"));
                Node::value(cost.saturating_add(arg_sum), Ty::Bool)
            }
            ("matches", Some(text), [regex]) => {
                let text_size = text.size();
                self.charge(&text_size, "matches a regex against");
                let text_cost = factor(text_size.max.saturating_add(1), STRING_TRAVERSAL);
                let regex_cost = factor(regex.size().max, REGEX_LENGTH);
                Node::value(
                    text_cost.saturating_mul(regex_cost).saturating_add(arg_sum),
                    Ty::Bool,
                )
            }
            ("int" | "uint" | "double" | "string", None, [_]) => {
                let ty = match name {
                    "int" => Ty::Int,
                    "uint" => Ty::Uint,
                    "double" => Ty::Double,
                    _ => Ty::String,
                };
                Node::value(1u64.saturating_add(arg_sum), ty)
            }
            _ => {
                return Err(EstimateError::Unsupported(format!(
                    "{name} with {} argument(s)",
                    args.len()
                )));
            }
        };
        Ok(node)
    }

    /// cel-go's `costComprehension`: the range, the accumulator's start and the result once,
    /// the loop condition and step once per element of the range.
    fn comprehension(&mut self, c: &ComprehensionExpr) -> Result<Node, EstimateError> {
        if c.iter_var2.is_some() {
            return Err(EstimateError::Unsupported(
                "a two-variable comprehension".into(),
            ));
        }
        let range = self.cost(&c.iter_range)?;
        let init = self.cost(&c.accu_init)?;
        let (iter_ty, iter_decl) = match range.ty.kind() {
            Kind::List => {
                let (ty, decl) = range.ty.elem();
                (ty, range.decl.as_ref().and(decl))
            }
            // A map iterates over its keys, which the API server declares without a size.
            Kind::Map => match &range.decl {
                Some(decl) => {
                    let key = decl.map_key();
                    (Ty::Schema(key.clone()), Some(key))
                }
                None => (Ty::String, None),
            },
            Kind::Dyn => (Ty::Dyn, None),
            _ => {
                return Err(EstimateError::Unsupported(
                    "a macro over a value that is not a list or map".into(),
                ));
            }
        };
        self.locals.push(Local {
            name: c.accu_var.clone(),
            ty: init.ty.clone(),
            decl: None,
            size: Some(init.size()),
        });
        self.locals.push(Local {
            name: c.iter_var.clone(),
            ty: iter_ty,
            decl: iter_decl,
            size: None,
        });
        let per_element = self.cost(&c.loop_cond).and_then(|condition| {
            let step = self.cost(&c.loop_step)?;
            Ok(condition.cost.saturating_add(step.cost))
        });
        self.locals.pop();
        let result = self.cost(&c.result);
        self.locals.pop();
        let (per_element, result) = (per_element?, result?);
        let range_size = range.size();
        self.charge(&range_size, "iterates over");
        let cost = range
            .cost
            .saturating_add(init.cost)
            .saturating_add(result.cost)
            .saturating_add(range_size.max.saturating_mul(per_element));
        let size = match &c.accu_init.expr {
            Expr::List(_) | Expr::Map(_) => range_size,
            _ => init.size(),
        };
        Ok(Node::value(cost, result.ty).sized(size))
    }

    /// An `==`, `!=` or string ordering: a traversal of the smaller operand (cel-go's
    /// `Equals`/`LessString`/… pricing), without the operands' own costs.
    fn comparison(&mut self, lhs: &Node, rhs: &Node) -> u64 {
        let (lhs, rhs) = (lhs.size(), rhs.size());
        let smaller = if rhs.max < lhs.max { rhs } else { lhs };
        self.traverse(&smaller, "compares")
    }

    /// A walk over a string of `size`, at 0.1 per byte.
    fn traverse(&mut self, size: &Size, verb: &str) -> u64 {
        self.charge(size, verb);
        factor(size.max, STRING_TRAVERSAL)
    }

    /// Records that the cost depends on a size the schema does not bound.
    fn charge(&mut self, size: &Size, verb: &str) {
        if let Some(why) = &size.unbounded {
            self.findings.push(format!("{verb} {why}"));
        }
    }

    /// The shapes of `==`/`!=` that the estimator underprices or that old servers refuse.
    fn check_equality(&mut self, op: &str, lhs: &Node, rhs: &Node) {
        let op = if op == "_==_" { "==" } else { "!=" };
        if lhs.presence_test || rhs.presence_test {
            self.findings.push(format!(
                "compares has() results with `{op}`, which Kubernetes 1.24 prices as unbounded: write `has(self.a) ? !has(self.b) : has(self.b)` for \"exactly one\""
            ));
        }
        for operand in [lhs, rhs] {
            let Some(decl) = &operand.decl else { continue };
            if !matches!(decl.kind, Kind::Object | Kind::List | Kind::Map) {
                continue;
            }
            if let Some(unbounded) = decl.first_unbounded() {
                self.findings.push(format!(
                    "compares `{}` as a whole with `{op}` while it holds `{}`, {}: the estimator prices that comparison as constant, yet it walks every byte",
                    display_path(&decl.path),
                    unbounded.path,
                    unbounded.unbounded_what()
                ));
            }
        }
    }
}

/// cel-go's `multiplyByCostFactor`: `ceil(x × factor)`, saturating.
fn factor(x: u64, factor: f64) -> u64 {
    let product = (x as f64 * factor).ceil();
    if product >= u64::MAX as f64 {
        u64::MAX
    } else {
        product as u64
    }
}

/// cel-go's constant costs (0) and `computeExprSize` for literals.
fn literal_node(literal: &LiteralValue) -> Node {
    let (ty, size) = match literal {
        LiteralValue::String(s) => (Ty::String, s.inner().chars().count() as u64),
        LiteralValue::Bytes(b) => (Ty::Bytes, b.inner().len() as u64),
        LiteralValue::Boolean(_) => (Ty::Bool, 1),
        LiteralValue::Int(_) => (Ty::Int, 1),
        LiteralValue::UInt(_) => (Ty::Uint, 1),
        LiteralValue::Double(_) => (Ty::Double, 1),
        LiteralValue::Null => (Ty::Null, 1),
    };
    Node::value(0, ty).sized(Size::exact(size))
}

fn display_path(path: &str) -> &str {
    if path.is_empty() { "self" } else { path }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn disk() -> Rc<Decl> {
        Decl::of(
            &json!({
                "type": "object",
                "properties": {
                    "volume": {"type": "string", "maxLength": 253},
                    "hostPath": {"type": "string", "maxLength": 4096},
                    "note": {"type": "string"},
                    "bootOrder": {"type": "integer"},
                    "tags": {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 8}},
                    "free": {"type": "array", "items": {"type": "integer"}}
                }
            }),
            "spec.disks[]",
            false,
        )
        .unwrap()
    }

    fn cost(rule: &str) -> Estimate {
        estimate(rule, disk()).unwrap()
    }

    #[test]
    fn presence_equality_is_unbounded_and_the_conditional_is_cheap() {
        let old = cost("has(self.volume) != has(self.hostPath)");
        // ceil((2^64 - 1) × 0.1) plus both presence tests (2 each).
        assert_eq!(old.cost, 1_844_674_407_370_955_264 + 4);
        assert!(
            old.findings
                .iter()
                .any(|f| f.contains("compares has() results"))
        );
        let new = cost("has(self.volume) ? !has(self.hostPath) : has(self.hostPath)");
        // has() 2, then the larger branch: `!` 1 + has() 2.
        assert_eq!(new.cost, 5);
        assert!(new.findings.is_empty(), "{:?}", new.findings);
    }

    #[test]
    fn comparisons_traverse_the_smaller_operand() {
        // self 1 + select 1, literal 0, ceil(min(1012, 3) × 0.1) = 1.
        assert_eq!(cost("self.volume == 'abc'").cost, 3);
        // Both sides bounded: ceil(min(1012, 16384) × 0.1) = 102, plus 2 + 2.
        assert_eq!(cost("self.volume == self.hostPath").cost, 106);
        let unbounded = cost("self.note == oldSelf.note");
        assert_eq!(unbounded.cost, 314_573 + 4);
        assert!(
            unbounded.findings[0].contains("`spec.disks[].note`, a string without maxLength"),
            "{:?}",
            unbounded.findings
        );
        // Integers have no size: an integer comparison costs its operands only.
        assert_eq!(cost("self.bootOrder == 1").cost, 2);
        assert_eq!(cost("self.bootOrder < 2").cost, 3);
    }

    #[test]
    fn macros_cost_their_body_per_item() {
        // range 2 + result 1 + 10 × (condition 2 + step (accumulator 1 + body 2)) — the body
        // `x == 'a'` is ident 1 + ceil(min(32, 1) × 0.1) 1.
        assert_eq!(
            cost("self.tags.all(x, x == 'a')").cost,
            2 + 1 + 10 * (2 + 1 + 2)
        );
        let free = cost("self.free.all(x, x > 0)");
        // (3 MiB - 2) / 2 items × (2 + 1 + 2).
        assert_eq!(free.cost, 2 + 1 + 1_572_863 * 5);
        assert!(free.findings[0].contains("a list without maxItems"));
    }

    #[test]
    fn whole_object_equality_with_unbounded_strings_is_a_finding() {
        let found = cost("self == oldSelf");
        assert_eq!(found.cost, 2, "the estimator prices it as constant");
        assert!(
            found.findings[0]
                .contains("while it holds `spec.disks[].free`, a list without maxItems"),
            "{:?}",
            found.findings
        );
    }

    #[test]
    fn refuses_what_it_cannot_price_or_the_server_would_not_compile() {
        assert!(matches!(
            estimate("self.volume.lowerAscii() == 'a'", disk()),
            Err(EstimateError::Unsupported(_))
        ));
        assert!(matches!(
            estimate("has(self.volumes)", disk()),
            Err(EstimateError::UnknownField { .. })
        ));
        assert!(matches!(
            estimate("other.volume == 'a'", disk()),
            Err(EstimateError::UnknownVariable(_))
        ));
        assert!(matches!(
            estimate("self.volume ==", disk()),
            Err(EstimateError::Parse(_))
        ));
    }
}
