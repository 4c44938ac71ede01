//! Message templates in Jinja syntax, rendered in a sandbox: no file system or network (no
//! loader is installed), bounded work (fuel), bounded output, strict undefined variables (a
//! typo is an error, not an empty string) and HTML auto-escaping in the HTML body.

use std::fmt;

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};

/// Instructions a single render may execute; stops a template that loops (nearly) forever.
pub const FUEL: u64 = 2_000_000;
/// Largest rendered part (subject, text, HTML or attachment).
pub const MAX_OUTPUT_BYTES: usize = 5 * 1024 * 1024;
/// Largest template source per part.
pub const MAX_SOURCE_BYTES: usize = 256 * 1024;

/// A stored or inline message template: subject, text body, optional HTML body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Template {
    pub subject: String,
    pub text: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub html: Option<String>,
}

/// A template rendered against one context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct Rendered {
    pub subject: String,
    pub text: String,
    pub html: Option<String>,
}

/// Which part of a template failed, where, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TemplateError {
    /// `subject`, `text`, `html`, `to[0]`, `condition`, `attachments[0].content`, ...
    pub part: String,
    pub line: Option<usize>,
    /// The expression the error points at, e.g. `user.nmae`, when known.
    pub near: Option<String>,
    pub message: String,
}

impl fmt::Display for TemplateError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.part)?;
        if let Some(line) = self.line {
            write!(f, ", line {line}")?;
        }
        write!(f, ": {}", self.message)?;
        if let Some(near) = &self.near {
            write!(f, " (at `{near}`)")?;
        }
        Ok(())
    }
}

impl std::error::Error for TemplateError {}

/// How undefined values behave: `Strict` for message text, `Lenient` for recipient fields,
/// where a missing value means "no recipient" (and the Fallback recipient may apply).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Undefined {
    Strict,
    Lenient,
}

/// A sandboxed engine. Fuel is counted per render, so one shared engine of each kind serves
/// every render (building an environment per message would repeat its setup on the hot path).
pub struct Engine {
    env: Environment<'static>,
    /// The parts rendered so far, compiled, each named by its escaping and its source: the
    /// same source renders again for every event a workflow mails and every message of a
    /// schedule run, and compiling it anew was most of a render's time. Emptied when it would
    /// hold more than `MAX_COMPILED` parts or `MAX_COMPILED_BYTES` of names and sources
    /// (previews render arbitrary sources, each up to `MAX_SOURCE_BYTES`). A part could name
    /// another kept here (`include`) only by its whole source: nothing it does not hold already.
    compiled: std::sync::RwLock<Compiled>,
}

/// An engine's compiled parts (`Engine::compiled`), how many, and their names' and sources' bytes.
struct Compiled {
    env: Environment<'static>,
    parts: usize,
    bytes: usize,
}

/// Most compiled parts an engine keeps.
const MAX_COMPILED: usize = 512;
/// Most bytes of names and sources an engine keeps compiled.
const MAX_COMPILED_BYTES: usize = 16 << 20;

/// A compiled part's name: its escaping (`html` or `plain`, what the auto-escape callback
/// reads), then its source.
fn compiled_name(escape_name: &str, source: &str) -> String {
    format!("{escape_name}\u{0}{source}")
}

impl Engine {
    /// Undefined variables are errors: message text, attachments, conditions.
    pub fn strict() -> &'static Engine {
        static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
        ENGINE.get_or_init(|| Engine::new(Undefined::Strict))
    }

    /// Undefined values render empty: recipient fields.
    pub fn lenient() -> &'static Engine {
        static ENGINE: std::sync::OnceLock<Engine> = std::sync::OnceLock::new();
        ENGINE.get_or_init(|| Engine::new(Undefined::Lenient))
    }

    fn new(undefined: Undefined) -> Engine {
        let mut env = Environment::new();
        env.set_undefined_behavior(match undefined {
            Undefined::Strict => UndefinedBehavior::Strict,
            Undefined::Lenient => UndefinedBehavior::Chainable,
        });
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(64);
        // Only a part named `html` is escaped; subject and text are plain text.
        env.set_auto_escape_callback(|name| match name.split('\u{0}').next() == Some("html") {
            true => AutoEscape::Html,
            false => AutoEscape::None,
        });
        env.set_keep_trailing_newline(true);
        Engine { compiled: std::sync::RwLock::new(Compiled { env: env.clone(), parts: 0, bytes: 0 }), env }
    }

    /// `source` compiled (once) as the part `escape_name`, rendered by `render` under the
    /// cache's lock (a read lock: renders run side by side).
    fn with_compiled<T>(
        &self,
        escape_name: &str,
        source: &str,
        render: impl FnOnce(minijinja::Template<'_, '_>) -> T,
    ) -> Result<T, minijinja::Error> {
        let name = compiled_name(escape_name, source);
        {
            let compiled = self.compiled.read().unwrap_or_else(|e| e.into_inner());
            if let Ok(template) = compiled.env.get_template(&name) {
                return Ok(render(template));
            }
        }
        let mut compiled = self.compiled.write().unwrap_or_else(|e| e.into_inner());
        if compiled.env.get_template(&name).is_err() {
            let bytes = name.len() + source.len();
            if compiled.parts >= MAX_COMPILED || compiled.bytes + bytes > MAX_COMPILED_BYTES {
                compiled.env.clear_templates();
                (compiled.parts, compiled.bytes) = (0, 0);
            }
            compiled.env.add_template_owned(name.clone(), source.to_string())?;
            compiled.parts += 1;
            compiled.bytes += bytes;
        }
        let template = compiled.env.get_template(&name)?;
        Ok(render(template))
    }

    /// Renders one part's `source` against `ctx`: a JSON value, or a context made once for the
    /// several parts of a message (`context`), which renders without being copied again.
    pub fn render<S: serde::Serialize + ?Sized>(
        &self,
        part: &str,
        source: &str,
        ctx: &S,
    ) -> Result<String, TemplateError> {
        if source.len() > MAX_SOURCE_BYTES {
            return Err(TemplateError {
                part: part.into(),
                line: None,
                near: None,
                message: format!("the template is larger than {} KiB", MAX_SOURCE_BYTES >> 10),
            });
        }
        let escape_name = if part == "html" { "html" } else { "plain" };
        let mut out = LimitedWriter::default();
        let rendered = self
            .with_compiled(escape_name, source, |template| template.render_captured_to(ctx, &mut out).map(drop))
            .map_err(|e| error(part, source, &e))?;
        match rendered {
            Ok(()) => Ok(String::from_utf8(out.buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into())),
            Err(_) if out.overflow => Err(TemplateError {
                part: part.into(),
                line: None,
                near: None,
                message: format!("the rendered text is larger than {} MiB", MAX_OUTPUT_BYTES >> 20),
            }),
            Err(e) => Err(error(part, source, &e)),
        }
    }

    /// Checks the syntax of one part without rendering it.
    pub fn check(&self, part: &str, source: &str) -> Result<(), TemplateError> {
        self.env.template_from_named_str("check", source).map(|_| ()).map_err(|e| error(part, source, &e))
    }

    /// Whether `source` may read the top-level variable `name` (a template it cannot parse may).
    pub fn reads(&self, source: &str, name: &str) -> bool {
        self.env.template_from_named_str("check", source).map_or(true, |t| t.undeclared_variables(false).contains(name))
    }

    /// Whether the condition `expression` may read the top-level variable `name`.
    pub fn condition_reads(&self, expression: &str, name: &str) -> bool {
        self.env.compile_expression(expression).map_or(true, |e| e.undeclared_variables(false).contains(name))
    }

    /// Checks a condition's syntax without evaluating it.
    pub fn condition_syntax(&self, expression: &str) -> Result<(), TemplateError> {
        self.env.compile_expression(expression).map(|_| ()).map_err(|e| error("condition", expression, &e))
    }

    /// Evaluates a condition such as `object.department == 'Finance'`.
    pub fn condition<C: serde::Serialize + ?Sized>(&self, expression: &str, ctx: &C) -> Result<bool, TemplateError> {
        let compiled = self.env.compile_expression(expression).map_err(|e| error("condition", expression, &e))?;
        let value = compiled.eval(ctx).map_err(|e| error("condition", expression, &e))?;
        Ok(value.is_true())
    }
}

/// `ctx` as the engine reads it, made once for the parts of one message: rendering a JSON
/// value copies all of it into the engine's own values, for each part (an event's object for
/// its subject, again for its text and again for each recipient); a context made here is read
/// where it is.
pub fn context<C: serde::Serialize + ?Sized>(ctx: &C) -> minijinja::Value {
    minijinja::Value::from_serialize(ctx)
}

impl Template {
    /// Checks every part's syntax, reporting all problems.
    pub fn check(&self) -> Result<(), Vec<TemplateError>> {
        let engine = Engine::strict();
        let mut errors = Vec::new();
        for (part, source) in self.parts() {
            if let Err(e) = engine.check(part, source) {
                errors.push(e);
            }
        }
        if self.subject.trim().is_empty() {
            errors.push(TemplateError { part: "subject".into(), line: None, near: None, message: "is empty".into() });
        }
        if errors.is_empty() { Ok(()) } else { Err(errors) }
    }

    pub fn render<S: serde::Serialize + ?Sized>(&self, ctx: &S) -> Result<Rendered, TemplateError> {
        let engine = Engine::strict();
        let subject = engine.render("subject", &self.subject, ctx)?;
        Ok(Rendered {
            // A subject is one header line: template newlines are folded into spaces.
            subject: subject.split(['\r', '\n']).map(str::trim).filter(|s| !s.is_empty()).collect::<Vec<_>>().join(" "),
            text: engine.render("text", &self.text, ctx)?,
            html: self.html.as_deref().map(|h| engine.render("html", h, ctx)).transpose()?,
        })
    }

    /// The sources of its parts.
    pub fn sources(&self) -> impl Iterator<Item = &str> {
        self.parts().map(|(_, source)| source)
    }

    fn parts(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [("subject", Some(self.subject.as_str())), ("text", Some(self.text.as_str())), ("html", self.html.as_deref())]
            .into_iter()
            .filter_map(|(p, s)| s.map(|s| (p, s)))
    }
}

fn error(part: &str, source: &str, e: &minijinja::Error) -> TemplateError {
    let near = e.range().and_then(|r| source.get(r)).map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    let message = match e.kind() {
        minijinja::ErrorKind::UndefinedError => match &near {
            Some(n) => format!("undefined variable or attribute: {n}"),
            None => "undefined variable or attribute".to_string(),
        },
        minijinja::ErrorKind::OutOfFuel => {
            "the template ran too long (fuel limit reached); check for loops over huge ranges".to_string()
        }
        _ => match e.detail() {
            Some(d) => format!("{}: {d}", e.kind()),
            None => e.kind().to_string(),
        },
    };
    TemplateError { part: part.into(), line: e.line(), near, message }
}

/// Collects output, failing once it passes `MAX_OUTPUT_BYTES`.
#[derive(Default)]
struct LimitedWriter {
    buf: Vec<u8>,
    overflow: bool,
}

impl std::io::Write for LimitedWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        if self.buf.len() + data.len() > MAX_OUTPUT_BYTES {
            self.overflow = true;
            return Err(std::io::Error::other("output limit"));
        }
        self.buf.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tpl(subject: &str, text: &str, html: Option<&str>) -> Template {
        Template { subject: subject.into(), text: text.into(), html: html.map(Into::into) }
    }

    #[test]
    fn renders_every_part_and_escapes_only_html() {
        let t = tpl("Welcome {{ object.name }}", "Hi {{ object.name }}!\n", Some("<p>Hi {{ object.name }}</p>"));
        let r = t.render(&json!({"object": {"name": "<b>Ann</b> & co"}})).unwrap();
        assert_eq!(r.subject, "Welcome <b>Ann</b> & co");
        assert_eq!(r.text, "Hi <b>Ann</b> & co!\n");
        assert_eq!(r.html.unwrap(), "<p>Hi &lt;b&gt;Ann&lt;&#x2f;b&gt; &amp; co</p>");
    }

    #[test]
    fn a_context_made_once_renders_every_part_as_its_json_does() {
        let t = tpl(
            "Welcome {{ object.name }} ({{ object.n }})",
            "{% for g in object.groups %}{{ g }},{% endfor %} {{ object.ok }} {{ object.none }}\n",
            Some("<p>{{ object.name }} {{ object.manager.mail }}</p>"),
        );
        let ctx = json!({"object": {"name": "<b>Ann</b>", "n": 1.5, "groups": ["a", "b"], "ok": true, "none": null,
            "manager": {"mail": "boss@example.org"}}});
        assert_eq!(t.render(&context(&ctx)).unwrap(), t.render(&ctx).unwrap());
        assert_eq!(
            t.render(&context(&ctx)).unwrap().html.unwrap(),
            "<p>&lt;b&gt;Ann&lt;&#x2f;b&gt; boss@example.org</p>"
        );
        // A missing value fails alike: the same part, line and expression.
        let missing = tpl("s", "line one\n{{ object.nope.deeper }}", None);
        assert_eq!(missing.render(&context(&ctx)).unwrap_err(), missing.render(&ctx).unwrap_err());
    }

    #[test]
    fn a_part_is_compiled_once_and_escaped_by_the_part_it_renders() {
        let engine = Engine::new(Undefined::Strict);
        let source = "Hi {{ object.name }}";
        let ctx = |name: &str| json!({"object": {"name": name}});
        assert_eq!(engine.render("text", source, &ctx("<b>Ann</b>")).unwrap(), "Hi <b>Ann</b>");
        assert_eq!(engine.render("html", source, &ctx("<b>Ann</b>")).unwrap(), "Hi &lt;b&gt;Ann&lt;&#x2f;b&gt;");
        // Each context its own output, the same compiled parts: one for text, one for HTML.
        assert_eq!(engine.render("subject", source, &ctx("Bob")).unwrap(), "Hi Bob");
        assert_eq!(engine.render("html", source, &ctx("Bob & co")).unwrap(), "Hi Bob &amp; co");
        assert_eq!(engine.compiled.read().unwrap().parts, 2);
        // An error is the same each time, and a part that does not compile is not kept.
        for _ in 0..2 {
            let e = engine.render("text", "line one\nHello {{ user.nmae }}", &json!({"user": {}})).unwrap_err();
            assert_eq!((e.line, e.near.as_deref()), (Some(2), Some("user.nmae")), "{e}");
            let e = engine.render("text", "{% if %}", &json!({})).unwrap_err();
            assert_eq!(e.part, "text");
        }
        assert_eq!(engine.compiled.read().unwrap().parts, 3);
        // Past the most parts it keeps, it starts again and renders as before.
        for i in 0..MAX_COMPILED + 10 {
            let source = format!("{i}: {{{{ object.name }}}}");
            assert_eq!(engine.render("text", &source, &ctx("Ann")).unwrap(), format!("{i}: Ann"));
        }
        assert!(engine.compiled.read().unwrap().parts <= MAX_COMPILED);
        // Past the most bytes too: large sources (previews) are not all kept.
        for i in 0..40 {
            let source = format!("{i}{}{{{{ object.name }}}}", " ".repeat(MAX_SOURCE_BYTES - 100));
            assert!(engine.render("text", &source, &ctx("Ann")).unwrap().ends_with("Ann"));
            let kept = engine.compiled.read().unwrap().bytes;
            assert!(kept <= MAX_COMPILED_BYTES, "{kept} bytes kept");
        }
        assert_eq!(engine.render("html", source, &ctx("<i>")).unwrap(), "Hi &lt;i&gt;");
    }

    #[test]
    fn a_missing_variable_names_the_line_and_the_expression() {
        let t = tpl("Hi", "line one\nHello {{ user.nmae }}\n", None);
        let e = t.render(&json!({"user": {"name": "Ann"}})).unwrap_err();
        assert_eq!(e.part, "text");
        assert_eq!(e.line, Some(2));
        assert!(e.to_string().contains("user.nmae"), "{e}");
    }

    #[test]
    fn an_endless_loop_is_stopped_by_the_fuel_limit() {
        let t =
            tpl("x", "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}", None);
        let e = t.render(&json!({})).unwrap_err();
        assert!(e.message.contains("fuel"), "{e}");
        let after = tpl("x", "{% for i in range(1000) %}{{ i }}{% endfor %}", None).render(&json!({}));
        assert!(after.is_ok(), "fuel is counted per render, not per shared engine: {after:?}");
    }

    #[test]
    fn output_is_bounded() {
        let t = tpl("x", "{% for i in range(90000) %}{{ big }}{% endfor %}", None);
        let e = t.render(&json!({"big": "x".repeat(1000)})).unwrap_err();
        assert!(e.message.contains("larger than"), "{e}");
    }

    #[test]
    fn syntax_errors_are_found_at_save_time_with_their_line() {
        let errors = tpl("{{ a ", "ok\n{% if x %}\n", None).check().unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0].part, "subject");
        assert_eq!(errors[1].part, "text");
        assert!(errors[1].line.is_some());
    }

    #[test]
    fn templates_cannot_reach_the_file_system() {
        let e = tpl("x", "{% include '/etc/passwd' %}", None).render(&json!({})).unwrap_err();
        assert!(e.message.contains("not found") || e.message.contains("template"), "{e}");
    }

    #[test]
    fn multi_line_subjects_fold_into_one_line() {
        let r = tpl("{% if a %}\nHello\n{% endif %}", "", None).render(&json!({"a": true})).unwrap();
        assert_eq!(r.subject, "Hello");
    }

    #[test]
    fn conditions_evaluate_over_the_event() {
        let e = Engine::strict();
        let ctx = json!({"object": {"department": "Finance"}});
        assert!(e.condition("object.department == 'Finance'", &ctx).unwrap());
        assert!(!e.condition("object.department == \"HR\"", &ctx).unwrap());
        assert!(e.condition("object.dept == 'x'", &ctx).is_err());
        assert!(e.condition("object.department ==", &ctx).is_err());
    }
}
