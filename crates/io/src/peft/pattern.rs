//! A small regular-expression matcher for PEFT module-name patterns (`target_modules` given as
//! a string, `feedforward_modules`, and the keys of `rank_pattern` / `alpha_pattern`).
//!
//! PEFT matches these with Python's `re` (`re.fullmatch(pattern, name)`, and
//! `re.match(rf"(.*\.)?({key})$", name)` for pattern keys; `peft/utils/other.py`
//! `get_pattern_key`, `peft/tuners/tuners_utils.py` `check_target_module_exists`). Only
//! *whether* a name matches matters, so the matcher tracks the set of positions each piece of
//! the pattern can reach (no backtracking, no exponential cases) and supports the part of
//! Python's syntax that module patterns use: literals, `.`, classes (`[a-z_]`, `[^0-9]`),
//! `\d \w \s \D \W \S`, escaped punctuation, groups (`(...)`, `(?:...)`, `(?P<name>...)`),
//! alternation, the quantifiers `* + ? {n} {n,} {,m} {n,m}` (lazy forms too), the anchors
//! `^ $ \A \Z \b \B`, and lookarounds `(?=...) (?!...) (?<=...) (?<!...)`. Backreferences and
//! inline flags are refused with a message naming them.

/// One piece of a parsed pattern.
#[derive(Debug, Clone)]
enum Node {
    /// Matches one character satisfying the class.
    Char(CharClass),
    /// Matches the pieces one after another.
    Concat(Vec<Node>),
    /// Matches any one of the alternatives.
    Alt(Vec<Node>),
    /// Matches the piece between `min` and `max` (None: unbounded) times.
    Repeat(Box<Node>, usize, Option<usize>),
    /// A zero-width assertion.
    Assert(Assertion),
    /// A lookaround: `ahead`, `negate`, the sub-pattern.
    Look(bool, bool, Box<Node>),
}

#[derive(Debug, Clone, Copy)]
enum Assertion {
    Start,
    End,
    WordBoundary,
    NotWordBoundary,
}

#[derive(Debug, Clone)]
enum CharClass {
    Any,
    Lit(char),
    Digit(bool),
    Word(bool),
    Space(bool),
    /// Items (ranges or nested classes), negated.
    Set(Vec<SetItem>, bool),
}

#[derive(Debug, Clone)]
enum SetItem {
    Range(char, char),
    Class(CharClass),
}

fn is_word(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

impl CharClass {
    fn matches(&self, c: char) -> bool {
        match self {
            CharClass::Any => c != '\n',
            CharClass::Lit(l) => *l == c,
            CharClass::Digit(neg) => c.is_numeric() != *neg,
            CharClass::Word(neg) => is_word(c) != *neg,
            CharClass::Space(neg) => c.is_whitespace() != *neg,
            CharClass::Set(items, neg) => {
                let hit = items.iter().any(|i| match i {
                    SetItem::Range(a, b) => *a <= c && c <= *b,
                    SetItem::Class(k) => k.matches(c),
                });
                hit != *neg
            }
        }
    }
}

/// A compiled pattern.
#[derive(Debug, Clone)]
pub(crate) struct Pattern {
    root: Node,
}

struct Parser<'a> {
    chars: Vec<char>,
    pos: usize,
    src: &'a str,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn eat(&mut self, c: char) -> bool {
        if self.peek() == Some(c) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn err(&self, what: &str) -> String {
        format!("pattern \"{}\": {what} at position {}", self.src, self.pos)
    }

    fn alt(&mut self) -> Result<Node, String> {
        let mut alts = vec![self.concat()?];
        while self.eat('|') {
            alts.push(self.concat()?);
        }
        Ok(if alts.len() == 1 {
            alts.pop().expect("one alternative")
        } else {
            Node::Alt(alts)
        })
    }

    fn concat(&mut self) -> Result<Node, String> {
        let mut items = Vec::new();
        while let Some(c) = self.peek() {
            if c == '|' || c == ')' {
                break;
            }
            let atom = self.atom()?;
            items.push(self.quantified(atom)?);
        }
        Ok(Node::Concat(items))
    }

    fn number(&mut self) -> Option<usize> {
        let start = self.pos;
        while self.peek().is_some_and(|c| c.is_ascii_digit()) {
            self.pos += 1;
        }
        if start == self.pos {
            return None;
        }
        self.chars[start..self.pos]
            .iter()
            .collect::<String>()
            .parse()
            .ok()
    }

    /// Reads a quantifier at the cursor: `(min, max)` and advances past it, or `None` (cursor
    /// unchanged) when none starts here. A `{` that starts no quantifier is a literal, as in
    /// Python.
    fn quantifier(&mut self) -> Result<Option<(usize, Option<usize>)>, String> {
        let q = match self.peek() {
            Some('*') => (0, None),
            Some('+') => (1, None),
            Some('?') => (0, Some(1)),
            Some('{') => {
                let save = self.pos;
                self.pos += 1;
                let lo = self.number();
                let bounds = if self.eat(',') {
                    Some((lo.unwrap_or(0), self.number()))
                } else {
                    lo.map(|n| (n, Some(n)))
                };
                match bounds {
                    Some((lo, hi)) if self.eat('}') => {
                        if hi.is_some_and(|h| h < lo) {
                            return Err(self.err("quantifier {n,m} with m < n"));
                        }
                        return Ok(Some((lo, hi)));
                    }
                    _ => {
                        self.pos = save;
                        return Ok(None);
                    }
                }
            }
            _ => return Ok(None),
        };
        self.pos += 1;
        Ok(Some(q))
    }

    fn quantified(&mut self, atom: Node) -> Result<Node, String> {
        let Some((min, max)) = self.quantifier()? else {
            return Ok(atom);
        };
        if matches!(atom, Node::Assert(_) | Node::Look(..)) {
            return Err(self.err("quantifier after an assertion"));
        }
        // Lazy quantifiers match the same set of strings.
        self.eat('?');
        if self.peek() == Some('+') {
            return Err(self.err("possessive quantifiers are not supported"));
        }
        let save = self.pos;
        if self.quantifier()?.is_some() {
            self.pos = save;
            return Err(self.err("multiple repeat"));
        }
        Ok(Node::Repeat(Box::new(atom), min, max))
    }

    fn escape(&mut self, in_set: bool) -> Result<CharClass, String> {
        let Some(c) = self.peek() else {
            return Err(self.err("pattern ends with a lone backslash"));
        };
        self.pos += 1;
        Ok(match c {
            'd' => CharClass::Digit(false),
            'D' => CharClass::Digit(true),
            'w' => CharClass::Word(false),
            'W' => CharClass::Word(true),
            's' => CharClass::Space(false),
            'S' => CharClass::Space(true),
            'n' => CharClass::Lit('\n'),
            't' => CharClass::Lit('\t'),
            'r' => CharClass::Lit('\r'),
            c if c.is_ascii_digit() && !in_set => {
                return Err(self.err("backreferences are not supported"))
            }
            c if c.is_ascii_alphanumeric() => {
                return Err(self.err(&format!("escape \\{c} is not supported")))
            }
            c => CharClass::Lit(c),
        })
    }

    fn set(&mut self) -> Result<CharClass, String> {
        let neg = self.eat('^');
        let mut items = Vec::new();
        let mut first = true;
        loop {
            let Some(c) = self.peek() else {
                return Err(self.err("unterminated character set"));
            };
            if c == ']' && !first {
                self.pos += 1;
                break;
            }
            first = false;
            self.pos += 1;
            let lo = if c == '\\' {
                match self.escape(true)? {
                    CharClass::Lit(l) => l,
                    other => {
                        items.push(SetItem::Class(other));
                        continue;
                    }
                }
            } else {
                c
            };
            if self.peek() == Some('-') && self.chars.get(self.pos + 1).is_some_and(|&n| n != ']') {
                self.pos += 1;
                let hc = self.peek().expect("checked above");
                self.pos += 1;
                let hi = if hc == '\\' {
                    match self.escape(true)? {
                        CharClass::Lit(l) => l,
                        _ => return Err(self.err("bad character range")),
                    }
                } else {
                    hc
                };
                if hi < lo {
                    return Err(self.err("bad character range"));
                }
                items.push(SetItem::Range(lo, hi));
            } else {
                items.push(SetItem::Range(lo, lo));
            }
        }
        Ok(CharClass::Set(items, neg))
    }

    fn atom(&mut self) -> Result<Node, String> {
        let c = self.peek().expect("caller checked");
        self.pos += 1;
        Ok(match c {
            '.' => Node::Char(CharClass::Any),
            '^' => Node::Assert(Assertion::Start),
            '$' => Node::Assert(Assertion::End),
            '[' => Node::Char(self.set()?),
            '*' | '+' | '?' => return Err(self.err("nothing to repeat")),
            '\\' => match self.peek() {
                Some('A') => {
                    self.pos += 1;
                    Node::Assert(Assertion::Start)
                }
                Some('Z') => {
                    self.pos += 1;
                    Node::Assert(Assertion::End)
                }
                Some('b') => {
                    self.pos += 1;
                    Node::Assert(Assertion::WordBoundary)
                }
                Some('B') => {
                    self.pos += 1;
                    Node::Assert(Assertion::NotWordBoundary)
                }
                _ => Node::Char(self.escape(false)?),
            },
            '(' => {
                let mut look = None;
                if self.eat('?') {
                    match self.peek() {
                        Some(':') => self.pos += 1,
                        Some('=') => {
                            self.pos += 1;
                            look = Some((true, false));
                        }
                        Some('!') => {
                            self.pos += 1;
                            look = Some((true, true));
                        }
                        Some('<') if matches!(self.chars.get(self.pos + 1), Some('=' | '!')) => {
                            let neg = self.chars[self.pos + 1] == '!';
                            self.pos += 2;
                            look = Some((false, neg));
                        }
                        Some('P') if self.chars.get(self.pos + 1) == Some(&'<') => {
                            while let Some(c) = self.peek() {
                                self.pos += 1;
                                if c == '>' {
                                    break;
                                }
                            }
                        }
                        _ => {
                            return Err(self.err(
                                "this group syntax (inline flags, named backreferences, conditionals) is not supported",
                            ))
                        }
                    }
                }
                let inner = self.alt()?;
                if !self.eat(')') {
                    return Err(self.err("missing )"));
                }
                match look {
                    Some((ahead, neg)) => Node::Look(ahead, neg, Box::new(inner)),
                    None => inner,
                }
            }
            ')' => return Err(self.err("unbalanced )")),
            c => Node::Char(CharClass::Lit(c)),
        })
    }
}

impl Pattern {
    /// Parses a Python-style regular expression; `Err` says what is unsupported or malformed.
    pub(crate) fn parse(src: &str) -> Result<Pattern, String> {
        let mut p = Parser {
            chars: src.chars().collect(),
            pos: 0,
            src,
        };
        let root = p.alt()?;
        if p.pos != p.chars.len() {
            return Err(p.err("unbalanced )"));
        }
        Ok(Pattern { root })
    }

    /// PEFT's pattern-key rule: whether `re.match(rf"(.*\.)?({key})$", name)` matches.
    pub(crate) fn parse_key(key: &str) -> Result<Pattern, String> {
        let inner = Pattern::parse(key)?;
        let prefix = Node::Repeat(
            Box::new(Node::Concat(vec![
                Node::Repeat(Box::new(Node::Char(CharClass::Any)), 0, None),
                Node::Char(CharClass::Lit('.')),
            ])),
            0,
            Some(1),
        );
        Ok(Pattern {
            root: Node::Concat(vec![prefix, inner.root]),
        })
    }

    /// Whether the whole of `text` matches (`re.fullmatch`).
    pub(crate) fn full_match(&self, text: &str) -> bool {
        let chars: Vec<char> = text.chars().collect();
        let mut start = vec![false; chars.len() + 1];
        start[0] = true;
        let end = step(&self.root, &chars, &start);
        end[chars.len()]
    }
}

/// The positions `node` can reach from any position set in `from`.
fn step(node: &Node, text: &[char], from: &[bool]) -> Vec<bool> {
    let n = text.len();
    match node {
        Node::Char(class) => {
            let mut out = vec![false; n + 1];
            for i in 0..n {
                if from[i] && class.matches(text[i]) {
                    out[i + 1] = true;
                }
            }
            out
        }
        Node::Concat(items) => {
            let mut cur = from.to_vec();
            for it in items {
                if !cur.iter().any(|&b| b) {
                    break;
                }
                cur = step(it, text, &cur);
            }
            cur
        }
        Node::Alt(alts) => {
            let mut out = vec![false; n + 1];
            for a in alts {
                for (o, r) in out.iter_mut().zip(step(a, text, from)) {
                    *o |= r;
                }
            }
            out
        }
        Node::Repeat(inner, min, max) => {
            let mut cur = from.to_vec();
            for _ in 0..*min {
                cur = step(inner, text, &cur);
            }
            let mut acc = cur.clone();
            let mut count = *min;
            // Each round adds positions; at most n + 1 rounds add something new.
            loop {
                if max.is_some_and(|m| count >= m) {
                    break;
                }
                let next = step(inner, text, &cur);
                count += 1;
                let mut grew = false;
                for (a, &x) in acc.iter_mut().zip(&next) {
                    if x && !*a {
                        *a = true;
                        grew = true;
                    }
                }
                if !grew {
                    break;
                }
                cur = next;
            }
            acc
        }
        Node::Assert(a) => {
            let mut out = vec![false; n + 1];
            for i in 0..=n {
                if from[i] {
                    let before = i > 0 && is_word(text[i - 1]);
                    let after = i < n && is_word(text[i]);
                    out[i] = match a {
                        Assertion::Start => i == 0,
                        Assertion::End => i == n || (i + 1 == n && text[i] == '\n'),
                        Assertion::WordBoundary => before != after,
                        Assertion::NotWordBoundary => before == after,
                    };
                }
            }
            out
        }
        Node::Look(ahead, neg, inner) => {
            let mut out = vec![false; n + 1];
            for i in 0..=n {
                if !from[i] {
                    continue;
                }
                let hit = if *ahead {
                    let mut s = vec![false; n + 1];
                    s[i] = true;
                    step(inner, text, &s).iter().any(|&b| b)
                } else {
                    (0..=i).any(|q| {
                        let mut s = vec![false; n + 1];
                        s[q] = true;
                        step(inner, text, &s)[i]
                    })
                };
                out[i] = hit != *neg;
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(p: &str, t: &str) -> bool {
        Pattern::parse(p).unwrap().full_match(t)
    }

    #[test]
    fn python_fullmatch_semantics() {
        // Expected values from Python's re.fullmatch.
        assert!(m("q_proj", "q_proj"));
        assert!(!m("q_proj", "x.q_proj"));
        assert!(m(r".*\.(q_proj|v_proj)", "model.layers.0.self_attn.q_proj"));
        assert!(!m(
            r".*\.(q_proj|v_proj)",
            "model.layers.0.self_attn.k_proj"
        ));
        assert!(m(
            r"model\.layers\.[0-9]+\.mlp\.\w+",
            "model.layers.12.mlp.up_proj"
        ));
        assert!(!m(
            r"model\.layers\.[0-9]+\.mlp\.\w+",
            "model.layers.x.mlp.up_proj"
        ));
        assert!(m(
            r"^(?!.*vision).*\.q_proj$",
            "model.layers.0.self_attn.q_proj"
        ));
        assert!(!m(
            r"^(?!.*vision).*\.q_proj$",
            "vision.layers.0.self_attn.q_proj"
        ));
        assert!(m(r"a{2,3}b", "aaab"));
        assert!(!m(r"a{2,3}b", "ab"));
        assert!(m(r"a{,2}", ""));
        assert!(m(r"x{y", "x{y"));
        assert!(m(r"[^.]+", "abc"));
        assert!(!m(r"[^.]+", "a.c"));
        assert!(m(r"(?:a|b)*?c", "ababc"));
        assert!(!m(r"(?<=\.)q", "q"));
        assert!(m(r".(?<=\.)q", ".q"));
        assert!(m(r".*\bq_proj", "attn.q_proj"));
        assert!(!m(r".*\bproj", "attn.q_proj"));
    }

    #[test]
    fn pattern_key_rule() {
        let k = Pattern::parse_key("q_proj").unwrap();
        assert!(k.full_match("model.layers.0.self_attn.q_proj"));
        assert!(k.full_match("q_proj"));
        assert!(!k.full_match("model.layers.0.self_attn.xq_proj"));
        let k = Pattern::parse_key("^model.layers.0.self_attn.q_proj").unwrap();
        assert!(k.full_match("model.layers.0.self_attn.q_proj"));
        assert!(!k.full_match("base.model.layers.0.self_attn.q_proj"));
        let k = Pattern::parse_key("layers.0.self_attn.q_proj|v_proj").unwrap();
        assert!(k.full_match("model.layers.3.self_attn.v_proj"));
    }

    #[test]
    fn unsupported_syntax_is_refused() {
        for p in [r"(a)\1", "(?i)abc", "a**", "(ab", "ab)", "[ab", "*a", r"\q"] {
            assert!(Pattern::parse(p).is_err(), "{p}");
        }
    }
}
