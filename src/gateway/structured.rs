//! Structured outputs on the chat endpoint: `response_format` with a JSON schema, and tool
//! calls the request requires (`tool_choice: "required"` with one tool, or a named one).
//! Both become a JSON schema the worker constrains generation to (see
//! `rbee_actors::worker::engine::json_schema`); a tool call's arguments are the generated
//! document. What rbee cannot do is refused by name: `json_object` (no schema to hold
//! to), `tool_choice: "auto"` (rbee does not decide whether to call a tool), several
//! tools without a name, streamed tool calls.

use rbee_actors::worker::api::{ChatMessage, Prompt};
use serde_json::Value;

use super::openai::{ApiError, ChatRequest};

/// What the answer must be.
#[derive(Debug, Default, PartialEq)]
pub struct Structure {
    /// The schema (JSON text) the answer is a document of.
    pub json_schema: Option<String>,
    /// The function the answer calls (its arguments being the document).
    pub tool: Option<String>,
}

fn invalid(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(Some(param), message)
}

/// The request's structure, and its prompt with a tool's instructions when it calls one.
pub fn structure(chat: &ChatRequest, prompt: Prompt) -> Result<(Structure, Prompt), ApiError> {
    let format = response_format(chat.response_format.as_ref())?;
    let tool = required_tool(chat)?;
    match (format, tool) {
        (Some(_), Some(_)) => Err(invalid(
            "response_format",
            "A response_format and a required tool call cannot both shape one answer.",
        )),
        (Some(schema), None) => Ok((
            Structure {
                json_schema: Some(schema),
                tool: None,
            },
            prompt,
        )),
        (None, Some((name, description, parameters))) => {
            if chat.sampling.stream {
                return Err(invalid(
                    "stream",
                    "Streamed tool calls are not supported yet; ask without stream.",
                ));
            }
            let note = format!(
                "Call the function `{name}`{}. Answer only with its arguments, a JSON object of this schema: {parameters}",
                description.map(|d| format!(" ({d})")).unwrap_or_default()
            );
            Ok((
                Structure {
                    json_schema: Some(parameters.to_string()),
                    tool: Some(name),
                },
                with_system_note(prompt, note),
            ))
        }
        (None, None) => Ok((Structure::default(), prompt)),
    }
}

/// The schema of `response_format`, if it asks for one.
fn response_format(format: Option<&Value>) -> Result<Option<String>, ApiError> {
    let Some(format) = format else {
        return Ok(None);
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_schema") => format
            .pointer("/json_schema/schema")
            .filter(|s| s.is_object())
            .map(|s| Some(s.to_string()))
            .ok_or_else(|| invalid("response_format", "json_schema needs a `schema` object.")),
        Some("json_object") => Err(invalid(
            "response_format",
            "json_object is not supported: give a json_schema, which rbee holds the answer to.",
        )),
        _ => Err(invalid(
            "response_format",
            "Expected type text or json_schema.",
        )),
    }
}

/// The tool the request requires: (name, description, parameters schema).
fn required_tool(chat: &ChatRequest) -> Result<Option<(String, Option<String>, Value)>, ApiError> {
    let tools = match &chat.tools {
        None => return Ok(None),
        Some(Value::Array(tools)) if tools.is_empty() => return Ok(None),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err(invalid("tools", "Expected a list of tools.")),
    };
    let function = |t: &Value| -> Result<(String, Option<String>, Value), ApiError> {
        let f = t
            .get("function")
            .filter(|_| t.get("type").and_then(Value::as_str) == Some("function"))
            .ok_or_else(|| invalid("tools", "Only tools of type function are supported."))?;
        let name = f
            .get("name")
            .and_then(Value::as_str)
            .ok_or_else(|| invalid("tools", "A function needs a name."))?;
        let description = f
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_string);
        let parameters = f
            .get("parameters")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}}));
        Ok((name.to_string(), description, parameters))
    };
    let named = match &chat.tool_choice {
        Some(Value::String(s)) if s == "none" => return Ok(None),
        Some(Value::String(s)) if s == "required" => None,
        None | Some(Value::String(_)) => {
            return Err(invalid(
                "tool_choice",
                "tool_choice auto is not supported: rbee calls a tool when told to (tool_choice required, or a named function).",
            ));
        }
        Some(choice) => Some(
            choice
                .pointer("/function/name")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(
                        "tool_choice",
                        "Expected none, required, or a named function.",
                    )
                })?,
        ),
    };
    let all: Vec<_> = tools.iter().map(function).collect::<Result<_, _>>()?;
    match named {
        Some(name) => all
            .into_iter()
            .find(|(n, ..)| n == name)
            .map(Some)
            .ok_or_else(|| invalid("tool_choice", format!("No tool is named {name:?}."))),
        None if all.len() == 1 => Ok(all.into_iter().next()),
        None => Err(invalid(
            "tool_choice",
            "With several tools, name the one to call in tool_choice.",
        )),
    }
}

/// `prompt` with `note` as (or ahead of) its system message.
fn with_system_note(prompt: Prompt, note: String) -> Prompt {
    match prompt {
        Prompt::Chat(mut messages) => {
            match messages.first_mut() {
                Some(first) if first.role == "system" => {
                    first.content = format!("{}\n\n{note}", first.content);
                }
                _ => messages.insert(
                    0,
                    ChatMessage {
                        role: "system".into(),
                        content: note,
                    },
                ),
            }
            Prompt::Chat(messages)
        }
        text => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(extra: Value) -> ChatRequest {
        let mut body =
            serde_json::json!({"model": "m", "messages": [{"role": "user", "content": "Hi"}]});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        serde_json::from_value(body).unwrap()
    }

    fn shaped(extra: Value) -> Result<(Structure, Prompt), ApiError> {
        let c = chat(extra);
        let prompt = c.prompt().unwrap();
        structure(&c, prompt)
    }

    #[test]
    fn a_schema_or_a_required_tool_becomes_the_schema_and_the_rest_is_refused_by_name() {
        let schema =
            serde_json::json!({"type": "object", "properties": {"a": {"type": "integer"}}});
        let (s, _) = shaped(serde_json::json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}})).unwrap();
        assert_eq!(s.json_schema.as_deref(), Some(schema.to_string().as_str()));
        let tool = serde_json::json!({"type": "function", "function": {"name": "f", "description": "d", "parameters": schema}});
        let (s, prompt) =
            shaped(serde_json::json!({"tools": [tool], "tool_choice": "required"})).unwrap();
        assert_eq!(s.tool.as_deref(), Some("f"));
        let Prompt::Chat(messages) = prompt else {
            panic!()
        };
        assert!(messages[0].role == "system" && messages[0].content.contains("`f` (d)"));
        let (s, _) = shaped(serde_json::json!({"tools": [tool], "tool_choice": "none"})).unwrap();
        assert_eq!(s, Structure::default());
        for (extra, param) in [
            (
                serde_json::json!({"response_format": {"type": "json_object"}}),
                "response_format",
            ),
            (serde_json::json!({"tools": [tool]}), "tool_choice"),
            (
                serde_json::json!({"tools": [tool, tool], "tool_choice": "required"}),
                "tool_choice",
            ),
            (
                serde_json::json!({"tools": [tool], "tool_choice": {"type": "function", "function": {"name": "g"}}}),
                "tool_choice",
            ),
            (
                serde_json::json!({"tools": [tool], "tool_choice": "required", "stream": true}),
                "stream",
            ),
        ] {
            let e = shaped(extra.clone()).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{extra}");
        }
    }
}
