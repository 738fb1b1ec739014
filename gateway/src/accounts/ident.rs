//! What account requests may contain: sign-in identifiers (E.164 phone
//! numbers, e-mail addresses) and the free text a user chooses (display
//! name, status text, device name and platform).
//!
//! Each is parsed into a value that can go anywhere the server writes it —
//! the account store, the one-time-code sender (a line of the development
//! `otp.log`, a webhook's JSON), logs, other users' screens — without
//! changing its meaning: no control characters, no line breaks, and for
//! identifiers no whitespace at all, so an identifier is always exactly one
//! field of a line. Whatever is refused is refused with [`InputError`], which
//! names the field and the rule and maps to `INVALID_ARGUMENT`.
//!
//! The rules:
//! - **Phone**: E.164: `+`, a country code that does not start with 0, then
//!   digits only; 8 to 15 digits in all.
//! - **E-mail**: sized as RFC 5321 (§4.5.3.1) allows: a local part of 1 to 64
//!   octets, a domain of at most 255, the whole address at most 254. Exactly
//!   one `@`. The local part is an RFC 5321 dot-string (letters, digits and
//!   ``!#$%&'*+-/=?^_`{|}~``, in dot-separated runs; no quoted local parts,
//!   no internationalised local parts). The domain has at least two labels,
//!   each 1 to 63 letters, digits or hyphens, neither starting nor ending with
//!   a hyphen (LDH; internationalised domains in their `xn--` form), and the
//!   last label is not all digits (no address literals). Surrounding
//!   whitespace is trimmed and the address is lower-cased first.
//! - **Free text** (display name, status text, device name, platform): no
//!   control characters (Unicode category Cc: C0, DEL, C1) and no line or
//!   paragraph separator (U+2028, U+2029); at most a field-specific number of
//!   characters.

use starling_protocol::v1;

/// Why an account request's input was refused (the client's fault).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InputError {
    /// No identifier, or neither phone nor e-mail set.
    #[error("identifier is required")]
    MissingIdentifier,
    /// Not an E.164 number.
    #[error("phone must be E.164: + and a country code not starting with 0, 8 to 15 digits in all")]
    BadPhone,
    /// Not an acceptable e-mail address; the reason says which rule.
    #[error("invalid e-mail address: {0}")]
    BadEmail(&'static str),
    /// A free-text field holds a control character or a line separator.
    #[error("{0}: control characters and line breaks are not allowed")]
    ControlCharacter(&'static str),
    /// A free-text field is too long.
    #[error("{field}: at most {max_chars} characters")]
    TooLong {
        /// The field.
        field: &'static str,
        /// Its limit.
        max_chars: usize,
    },
}

/// Longest display name, in characters.
pub const DISPLAY_NAME_CHARS_MAX: usize = 100;
/// Longest status text (`about`), in characters.
pub const ABOUT_CHARS_MAX: usize = 500;
/// Longest device name, in characters.
pub const DEVICE_NAME_CHARS_MAX: usize = 100;
/// Longest device platform, in characters.
pub const PLATFORM_CHARS_MAX: usize = 32;

/// RFC 5321 §4.5.3.1.1: local part.
const LOCAL_PART_BYTES_MAX: usize = 64;
/// RFC 5321 §4.5.3.1.2: domain.
const DOMAIN_BYTES_MAX: usize = 255;
/// RFC 5321 §4.5.3.1.3 (a 256-octet path, less its angle brackets).
const EMAIL_BYTES_MAX: usize = 254;
/// RFC 1035 §2.3.4: a label.
const LABEL_BYTES_MAX: usize = 63;
/// E.164: at most 15 digits; 8 is the shortest number in use with its country code.
const PHONE_DIGITS: std::ops::RangeInclusive<usize> = 8..=15;

const _: () = assert!(LOCAL_PART_BYTES_MAX + 1 + LABEL_BYTES_MAX <= EMAIL_BYTES_MAX);

/// What kind of identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentKind {
    /// An E.164 phone number.
    Phone,
    /// An e-mail address.
    Email,
}

/// A parsed, normalised identifier: safe to store, log and write as one
/// field of a line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ident {
    kind: IdentKind,
    /// `phone:+1...` or `email:a@b`: the account store's key.
    key: String,
}

impl Ident {
    /// Parses the identifier of an account request.
    ///
    /// # Errors
    /// [`InputError`] naming the rule it breaks.
    pub fn parse(id: Option<&v1::Identifier>) -> Result<Self, InputError> {
        match id.and_then(|i| i.kind.as_ref()) {
            Some(v1::identifier::Kind::Phone(p)) => Ok(Self {
                kind: IdentKind::Phone,
                key: format!("phone:{}", parse_phone(p)?),
            }),
            Some(v1::identifier::Kind::Email(e)) => Ok(Self {
                kind: IdentKind::Email,
                key: format!("email:{}", parse_email(e)?),
            }),
            None => Err(InputError::MissingIdentifier),
        }
    }

    /// The kind.
    #[must_use]
    pub fn kind(&self) -> IdentKind {
        self.kind
    }

    /// The account store's key (`phone:+1...`, `email:a@b`).
    #[must_use]
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The bare number or address.
    #[must_use]
    pub fn value(&self) -> &str {
        self.key.split_once(':').map_or("", |(_, v)| v)
    }
}

/// An E.164 number, as given (no formatting is removed).
fn parse_phone(p: &str) -> Result<&str, InputError> {
    let digits = p.strip_prefix('+').ok_or(InputError::BadPhone)?;
    if !PHONE_DIGITS.contains(&digits.len())
        || !digits.bytes().all(|b| b.is_ascii_digit())
        || digits.starts_with('0')
    {
        return Err(InputError::BadPhone);
    }
    Ok(p)
}

/// An e-mail address, trimmed and lower-cased.
fn parse_email(e: &str) -> Result<String, InputError> {
    let e = e.trim();
    if e.chars()
        .any(|c| c.is_control() || c.is_whitespace() || is_line_separator(c))
    {
        return Err(InputError::BadEmail(
            "whitespace and control characters are not allowed",
        ));
    }
    if e.len() > EMAIL_BYTES_MAX {
        return Err(InputError::BadEmail("longer than 254 octets"));
    }
    let (local, domain) = e.split_once('@').ok_or(InputError::BadEmail("no @"))?;
    if domain.contains('@') {
        return Err(InputError::BadEmail("more than one @"));
    }
    check_local_part(local)?;
    check_domain(domain)?;
    Ok(e.to_ascii_lowercase())
}

/// RFC 5321 Dot-string: Atom *("." Atom).
fn check_local_part(local: &str) -> Result<(), InputError> {
    if local.is_empty() {
        return Err(InputError::BadEmail("empty local part"));
    }
    if local.len() > LOCAL_PART_BYTES_MAX {
        return Err(InputError::BadEmail("local part longer than 64 octets"));
    }
    for atom in local.split('.') {
        if atom.is_empty() {
            return Err(InputError::BadEmail(
                "local part starts or ends with a dot, or has two in a row",
            ));
        }
        if !atom.bytes().all(is_atext) {
            return Err(InputError::BadEmail(
                "local part may hold letters, digits and !#$%&'*+-/=?^_`{|}~ only",
            ));
        }
    }
    Ok(())
}

/// RFC 5322 atext (the characters of an unquoted atom).
fn is_atext(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-/=?^_`{|}~".contains(&b)
}

/// A dotted domain of LDH labels.
fn check_domain(domain: &str) -> Result<(), InputError> {
    if domain.len() > DOMAIN_BYTES_MAX {
        return Err(InputError::BadEmail("domain longer than 255 octets"));
    }
    let labels: Vec<&str> = domain.split('.').collect();
    if labels.len() < 2 {
        return Err(InputError::BadEmail("domain must have at least two labels"));
    }
    for label in &labels {
        if label.is_empty() || label.len() > LABEL_BYTES_MAX {
            return Err(InputError::BadEmail("domain labels are 1 to 63 octets"));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(InputError::BadEmail(
                "domain labels hold letters, digits and hyphens only",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(InputError::BadEmail(
                "domain labels neither start nor end with a hyphen",
            ));
        }
    }
    if labels
        .last()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(InputError::BadEmail(
            "the top-level domain is not numeric (no address literals)",
        ));
    }
    Ok(())
}

fn is_line_separator(c: char) -> bool {
    matches!(c, '\u{2028}' | '\u{2029}')
}

/// Checks one line of free text: no control characters or line breaks, at
/// most `max_chars` characters.
///
/// # Errors
/// [`InputError::ControlCharacter`] or [`InputError::TooLong`], naming `field`.
pub fn check_text(field: &'static str, s: &str, max_chars: usize) -> Result<(), InputError> {
    if s.chars().any(|c| c.is_control() || is_line_separator(c)) {
        return Err(InputError::ControlCharacter(field));
    }
    if s.chars().count() > max_chars {
        return Err(InputError::TooLong { field, max_chars });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phone(p: &str) -> Result<Ident, InputError> {
        Ident::parse(Some(&v1::Identifier {
            kind: Some(v1::identifier::Kind::Phone(p.into())),
        }))
    }

    fn email(e: &str) -> Result<Ident, InputError> {
        Ident::parse(Some(&v1::Identifier {
            kind: Some(v1::identifier::Kind::Email(e.into())),
        }))
    }

    fn bad_email(e: &str) -> &'static str {
        match email(e) {
            Err(InputError::BadEmail(why)) => why,
            other => panic!("{e:?}: {other:?}"),
        }
    }

    #[test]
    fn phones_are_e164() {
        let p = phone("+14155550100").unwrap();
        assert_eq!(
            (p.kind(), p.key(), p.value()),
            (IdentKind::Phone, "phone:+14155550100", "+14155550100")
        );
        // 8 and 15 digits are the bounds.
        assert!(phone("+12345678").is_ok());
        assert!(phone("+123456789012345").is_ok());
        for bad in [
            "14155550100",       // no +
            "+1234567",          // 7 digits
            "+1234567890123456", // 16 digits
            "+04155550100",      // country code starting with 0
            "+1415 5550100",     // whitespace
            "+1415-555-0100",    // formatting
            "+1415x550100",
            "+1415555010\n",
            "+",
            "",
            "+１４１５５５５０１００", // full-width digits
        ] {
            assert_eq!(phone(bad), Err(InputError::BadPhone), "{bad:?}");
        }
    }

    #[test]
    fn emails_are_normalised() {
        let e = email(" Ana@Example.org ").unwrap();
        assert_eq!(
            (e.kind(), e.key(), e.value()),
            (IdentKind::Email, "email:ana@example.org", "ana@example.org")
        );
        for ok in [
            "a@b.co",
            "first.last+tag@sub.example.org",
            "o'brien@example.ie",
            "x_y-z!#$%&*/=?^`{|}~@example.com",
            "a@xn--bcher-kva.example",
            "a@123.example",
        ] {
            assert!(email(ok).is_ok(), "{ok:?}");
        }
    }

    #[test]
    fn emails_refuse_line_breaks_control_characters_and_whitespace() {
        // The address that once wrote a forged line into otp.log.
        assert_eq!(
            bad_email("x\n+1999 000000@rel.test"),
            "whitespace and control characters are not allowed"
        );
        for bad in [
            "a b@example.org",
            "a\tb@example.org",
            "a\r@example.org",
            "a\u{0}@example.org",
            "a\u{7f}@example.org",
            "a\u{85}@example.org",
            "a\u{2028}@example.org",
            "a@exa mple.org",
            "a@example.org\u{a0}x",
        ] {
            assert_eq!(
                bad_email(bad),
                "whitespace and control characters are not allowed",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn emails_have_one_at_and_a_dot_string_local_part() {
        assert_eq!(bad_email("example.org"), "no @");
        assert_eq!(bad_email("a@b@example.org"), "more than one @");
        assert_eq!(bad_email("@example.org"), "empty local part");
        for bad in [".a@example.org", "a.@example.org", "a..b@example.org"] {
            assert_eq!(
                bad_email(bad),
                "local part starts or ends with a dot, or has two in a row",
                "{bad:?}"
            );
        }
        for bad in [
            "\"a\"@example.org",
            "a(b)@example.org",
            "a,b@example.org",
            "a<b>@example.org",
            "josé@example.org",
        ] {
            assert_eq!(
                bad_email(bad),
                "local part may hold letters, digits and !#$%&'*+-/=?^_`{|}~ only",
                "{bad:?}"
            );
        }
    }

    #[test]
    fn emails_have_a_dotted_ldh_domain() {
        assert_eq!(
            bad_email("a@localhost"),
            "domain must have at least two labels"
        );
        for bad in ["a@example..org", "a@.example.org", "a@example.org."] {
            assert_eq!(
                bad_email(bad),
                "domain labels are 1 to 63 octets",
                "{bad:?}"
            );
        }
        for bad in ["a@exa_mple.org", "a@[1.2.3.4]", "a@bücher.example"] {
            assert_eq!(
                bad_email(bad),
                "domain labels hold letters, digits and hyphens only",
                "{bad:?}"
            );
        }
        for bad in ["a@-example.org", "a@example-.org"] {
            assert_eq!(
                bad_email(bad),
                "domain labels neither start nor end with a hyphen",
                "{bad:?}"
            );
        }
        assert_eq!(
            bad_email("a@1.2.3.4"),
            "the top-level domain is not numeric (no address literals)"
        );
    }

    #[test]
    fn emails_are_rfc5321_sized() {
        let label63 = "d".repeat(63);
        // Local part: 64 octets is the most.
        assert!(email(&format!("{}@example.org", "l".repeat(64))).is_ok());
        assert_eq!(
            bad_email(&format!("{}@example.org", "l".repeat(65))),
            "local part longer than 64 octets"
        );
        // A label: 63 octets is the most.
        assert!(email(&format!("a@{label63}.org")).is_ok());
        assert_eq!(
            bad_email(&format!("a@{label63}d.org")),
            "domain labels are 1 to 63 octets"
        );
        // The whole address: 254 octets is the most.
        let domain = format!("{label63}.{label63}.{label63}.{}", "d".repeat(57));
        let at_most = format!("{}@{domain}", "l".repeat(4));
        assert_eq!(at_most.len(), 254);
        assert!(email(&at_most).is_ok());
        let over = format!("{}@{domain}", "l".repeat(5));
        assert_eq!(bad_email(&over), "longer than 254 octets");
        // The domain alone: 255 octets is the most; a longer one fails the
        // whole address's limit first, so check the domain rule directly.
        let long_domain = format!("{label63}.{label63}.{label63}.{label63}.d");
        assert_eq!(long_domain.len(), 257);
        assert_eq!(
            check_domain(&long_domain),
            Err(InputError::BadEmail("domain longer than 255 octets"))
        );
    }

    #[test]
    fn an_identifier_is_required() {
        assert_eq!(Ident::parse(None), Err(InputError::MissingIdentifier));
        assert_eq!(
            Ident::parse(Some(&v1::Identifier { kind: None })),
            Err(InputError::MissingIdentifier)
        );
    }

    #[test]
    fn free_text_is_one_line_without_control_characters() {
        assert!(check_text("display_name", "Ana Lúcia 🐦", 100).is_ok());
        assert!(check_text("display_name", "", 100).is_ok());
        for bad in [
            "Ana\nEve",
            "Ana\r",
            "tab\there",
            "nul\u{0}",
            "esc\u{1b}[31m",
            "del\u{7f}",
            "c1\u{85}",
            "ls\u{2028}",
            "ps\u{2029}",
        ] {
            assert_eq!(
                check_text("display_name", bad, 100),
                Err(InputError::ControlCharacter("display_name")),
                "{bad:?}"
            );
        }
        // Characters, not bytes.
        assert!(check_text("name", &"é".repeat(3), 3).is_ok());
        assert_eq!(
            check_text("name", &"é".repeat(4), 3),
            Err(InputError::TooLong {
                field: "name",
                max_chars: 3
            })
        );
    }
}
