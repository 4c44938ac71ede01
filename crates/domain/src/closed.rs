//! Closed sets of names: security modes, auth modes, message states, origins, providers. One
//! macro gives each the same text form in the database, the API, the CLI and the UI, and the
//! same parse, so a stored or typed value is either one of the set or an error naming the set.

/// `string_enum!(/// doc  Name { Variant = "text" => "Label", ... })`: the enum, `ALL` (the
/// texts), `VARIANTS`, `as_str`, `parse` (trimmed, ASCII case-insensitive), `label` (for forms;
/// the text when none is given), `Display`, serde as the text, and an order (declaration order).
#[macro_export]
macro_rules! string_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal $(=> $label:literal)?),+ $(,)? }) => {
        $crate::string_enum!(custom_display; $(#[$m])* $name { $($(#[$vm])* $variant = $text $(=> $label)?),+ });

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                // `pad`, so that `{:<9}` lines columns up as it does for a string.
                f.pad(self.as_str())
            }
        }
    };
    // The same without `Display`, for a set that shows itself otherwise (stages in capitals).
    (custom_display; $(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $variant:ident = $text:literal $(=> $label:literal)?),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name { $($(#[$vm])* $variant),+ }

        impl $name {
            pub const ALL: &'static [&'static str] = &[$($text),+];
            pub const VARIANTS: &'static [$name] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            pub fn parse(s: &str) -> Option<Self> {
                let s = s.trim();
                $(if s.eq_ignore_ascii_case($text) { return Some(Self::$variant); })+
                None
            }

            /// Each value with its label, for a form's options.
            pub fn options() -> Vec<(&'static str, &'static str)> {
                Self::VARIANTS.iter().map(|v| (v.as_str(), v.label())).collect()
            }

            /// How a form names the value.
            pub fn label(self) -> &'static str {
                match self { $(Self::$variant => $crate::string_enum!(@label $text $(, $label)?)),+ }
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        // The API's schema: one of the texts, as serde reads and writes them.
        impl $crate::schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut $crate::schemars::SchemaGenerator) -> $crate::schemars::Schema {
                $crate::schemars::json_schema!({"type": "string", "enum": Self::ALL})
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let text = <std::borrow::Cow<'de, str> as serde::Deserialize>::deserialize(d)?;
                Self::parse(&text).ok_or_else(|| {
                    serde::de::Error::custom(format_args!("'{text}' is not one of {}", Self::ALL.join(", ")))
                })
            }
        }
    };
    (@label $text:literal) => { $text };
    (@label $text:literal, $label:literal) => { $label };
}

#[cfg(test)]
mod tests {
    string_enum!(
        /// A test set.
        Colour { Red = "red" => "Bright red", DarkBlue = "dark_blue" }
    );

    #[test]
    fn text_form_round_trips_and_parse_is_forgiving() {
        for v in Colour::VARIANTS {
            assert_eq!(Colour::parse(v.as_str()), Some(*v));
            let json = serde_json::to_string(v).unwrap();
            assert_eq!(serde_json::from_str::<Colour>(&json).unwrap(), *v);
        }
        assert_eq!(Colour::parse(" RED "), Some(Colour::Red));
        assert_eq!(Colour::parse("green"), None);
        assert_eq!(Colour::Red.label(), "Bright red");
        assert_eq!(Colour::options(), [("red", "Bright red"), ("dark_blue", "dark_blue")]);
        let err = serde_json::from_str::<Colour>("\"green\"").unwrap_err().to_string();
        assert!(err.contains("'green' is not one of red, dark_blue"), "{err}");
    }
}
