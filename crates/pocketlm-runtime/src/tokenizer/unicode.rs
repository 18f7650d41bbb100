//! The Unicode facts tokenizer patterns ask about: general categories (`\p{L}`, `\p{N}`, ...),
//! `\s`, `\w`, `\d`, and simple case folding for `(?i:...)`.

use unicode_general_category::{GeneralCategory, get_general_category};

/// The punctuation categories (`\p{P}`).
const PUNCTUATION: [GeneralCategory; 7] = [
    GeneralCategory::ConnectorPunctuation,
    GeneralCategory::DashPunctuation,
    GeneralCategory::OpenPunctuation,
    GeneralCategory::ClosePunctuation,
    GeneralCategory::InitialPunctuation,
    GeneralCategory::FinalPunctuation,
    GeneralCategory::OtherPunctuation,
];

/// A set of general categories, one bit per [`GeneralCategory`] variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Categories(u32);

impl Categories {
    /// The categories a `\p{NAME}` name denotes (one- and two-letter abbreviations and the long
    /// names of the seven major classes, as Unicode regexes accept them), or `None`.
    pub(super) fn by_name(name: &str) -> Option<Categories> {
        use GeneralCategory::*;
        let set: &[GeneralCategory] = match name {
            "L" | "Letter" => &[
                UppercaseLetter,
                LowercaseLetter,
                TitlecaseLetter,
                ModifierLetter,
                OtherLetter,
            ],
            "LC" | "L&" | "Cased_Letter" => &[UppercaseLetter, LowercaseLetter, TitlecaseLetter],
            "Lu" | "Uppercase_Letter" => &[UppercaseLetter],
            "Ll" | "Lowercase_Letter" => &[LowercaseLetter],
            "Lt" | "Titlecase_Letter" => &[TitlecaseLetter],
            "Lm" | "Modifier_Letter" => &[ModifierLetter],
            "Lo" | "Other_Letter" => &[OtherLetter],
            "M" | "Mark" | "Combining_Mark" => &[NonspacingMark, SpacingMark, EnclosingMark],
            "Mn" | "Nonspacing_Mark" => &[NonspacingMark],
            "Mc" | "Spacing_Mark" => &[SpacingMark],
            "Me" | "Enclosing_Mark" => &[EnclosingMark],
            "N" | "Number" => &[DecimalNumber, LetterNumber, OtherNumber],
            "Nd" | "Decimal_Number" => &[DecimalNumber],
            "Nl" | "Letter_Number" => &[LetterNumber],
            "No" | "Other_Number" => &[OtherNumber],
            "P" | "Punctuation" => &PUNCTUATION,
            "Pc" | "Connector_Punctuation" => &[ConnectorPunctuation],
            "Pd" | "Dash_Punctuation" => &[DashPunctuation],
            "Ps" | "Open_Punctuation" => &[OpenPunctuation],
            "Pe" | "Close_Punctuation" => &[ClosePunctuation],
            "Pi" | "Initial_Punctuation" => &[InitialPunctuation],
            "Pf" | "Final_Punctuation" => &[FinalPunctuation],
            "Po" | "Other_Punctuation" => &[OtherPunctuation],
            "S" | "Symbol" => &[MathSymbol, CurrencySymbol, ModifierSymbol, OtherSymbol],
            "Sm" | "Math_Symbol" => &[MathSymbol],
            "Sc" | "Currency_Symbol" => &[CurrencySymbol],
            "Sk" | "Modifier_Symbol" => &[ModifierSymbol],
            "So" | "Other_Symbol" => &[OtherSymbol],
            "Z" | "Separator" => &[SpaceSeparator, LineSeparator, ParagraphSeparator],
            "Zs" | "Space_Separator" => &[SpaceSeparator],
            "Zl" | "Line_Separator" => &[LineSeparator],
            "Zp" | "Paragraph_Separator" => &[ParagraphSeparator],
            "C" | "Other" => &[Control, Format, Surrogate, PrivateUse, Unassigned],
            "Cc" | "Control" => &[Control],
            "Cf" | "Format" => &[Format],
            "Cs" | "Surrogate" => &[Surrogate],
            "Co" | "Private_Use" => &[PrivateUse],
            "Cn" | "Unassigned" => &[Unassigned],
            _ => return None,
        };
        Some(Categories(
            set.iter().fold(0, |bits, &c| bits | category_bit(c)),
        ))
    }

    pub(super) fn contains(self, c: char) -> bool {
        self.0 & category_bit(category(c)) != 0
    }
}

fn category_bit(c: GeneralCategory) -> u32 {
    1 << (c as u32)
}

/// The general category of `c`, with ASCII answered without the table search.
pub(super) fn category(c: char) -> GeneralCategory {
    use GeneralCategory::*;
    match c {
        'a'..='z' => LowercaseLetter,
        'A'..='Z' => UppercaseLetter,
        '0'..='9' => DecimalNumber,
        ' ' => SpaceSeparator,
        _ => get_general_category(c),
    }
}

/// `\p{P}`: any punctuation category.
pub(super) fn is_punctuation(c: char) -> bool {
    PUNCTUATION.contains(&category(c))
}

/// `\s`: the Unicode White_Space property.
pub(super) fn is_space(c: char) -> bool {
    c.is_whitespace()
}

/// `\d`: decimal digits of any script (`\p{Nd}`).
pub(super) fn is_digit(c: char) -> bool {
    category(c) == GeneralCategory::DecimalNumber
}

/// `\w`: Alphabetic, marks, decimal digits, connector punctuation and the joiners.
pub(super) fn is_word(c: char) -> bool {
    use GeneralCategory::*;
    c.is_alphabetic()
        || matches!(
            category(c),
            NonspacingMark | SpacingMark | EnclosingMark | DecimalNumber | ConnectorPunctuation
        )
        || matches!(c, '\u{200C}' | '\u{200D}')
}

/// Simple case folding: the representative of `c`'s case-insensitive equivalence class, for
/// the folds a one-char lowercase mapping misses (`ſ` is an `s`, the Kelvin sign a `k`).
pub(super) fn fold(c: char) -> char {
    match c {
        '\u{017F}' => 's',
        '\u{212A}' => 'k',
        '\u{212B}' => '\u{E5}',
        '\u{1E9E}' => '\u{DF}',
        '\u{03C2}' | '\u{03A3}' => '\u{03C3}',
        _ => {
            let mut lower = c.to_lowercase();
            match (lower.next(), lower.next()) {
                (Some(l), None) => l,
                _ => c,
            }
        }
    }
}

/// The chars that fold to the same representative as `c` (itself included), for
/// case-insensitive classes.
pub(super) fn case_variants(c: char) -> impl Iterator<Item = char> {
    let folded = fold(c);
    let mut upper = folded.to_uppercase();
    let upper = match (upper.next(), upper.next()) {
        (Some(u), None) => Some(u),
        _ => None,
    };
    let extra = match folded {
        's' => Some('\u{017F}'),
        'k' => Some('\u{212A}'),
        '\u{E5}' => Some('\u{212B}'),
        _ => None,
    };
    [Some(c), Some(folded), upper, extra].into_iter().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn categories_by_name() {
        let letters = Categories::by_name("L").unwrap();
        assert!(letters.contains('a') && letters.contains('Ж') && letters.contains('中'));
        assert!(!letters.contains('1') && !letters.contains(' ') && !letters.contains('\u{301}'));
        let marks = Categories::by_name("M").unwrap();
        assert!(marks.contains('\u{301}') && marks.contains('\u{93F}'));
        let numbers = Categories::by_name("N").unwrap();
        assert!(numbers.contains('7') && numbers.contains('²') && numbers.contains('Ⅻ'));
        assert_eq!(
            Categories::by_name("Lu").map(|c| c.contains('É')),
            Some(true)
        );
        assert!(Categories::by_name("Han").is_none());
    }

    #[test]
    fn ascii_fast_path_agrees_with_the_table() {
        for b in 0u8..128 {
            let c = char::from(b);
            assert_eq!(category(c), get_general_category(c), "{c:?}");
        }
    }

    #[test]
    fn folding() {
        assert_eq!(fold('S'), 's');
        assert_eq!(fold('ſ'), 's');
        assert_eq!(fold('K'), fold('\u{212A}'));
        assert!(case_variants('s').any(|c| c == 'ſ'));
        assert!(case_variants('T').any(|c| c == 't'));
        assert!(is_word('_') && is_word('é') && !is_word('-'));
        assert!(is_digit('٣') && !is_digit('²'));
    }
}
