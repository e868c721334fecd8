"""Agents as data: a `kind: agent` document (name, prompt with $names, llm, connections, tools, limits, hooks) read
and checked into an AgentConfig, which agent_tree compiles to a tree.
"""

from __future__ import annotations

import copy
from typing import Any

from . import spec_names
from .agent_tree import DEFAULT_MAX_ITERATIONS, AgentConfig, compile_agent
from .spec_build import VERSION, Builder, spec_hash
from .spec_lookup import LocalNames, Names
from .spec_source import Document, Problem, SpecError
from .spec_text import Path, substitute

AGENT_KEYS = ("tasktree", "kind", "name", "description", "prompt", "system", "vars", "blackboard", "tools", "llm",
              "connections", "max_iterations", "max_total_tokens", "pre_hook", "post_hook")
LLM_KEYS = ("model", "connection", "temperature", "max_tokens", "extra_body")
CONNECTION_KEYS = ("base_url", "api_key_env", "api_key")


def _is_prompt(path: Path) -> bool:
    return bool(path) and path[-1] in ("prompt", "system")


class _AgentReader:
    """Checks an agent document (and the agents among its tools) and reads it into an AgentConfig."""

    def __init__(self, doc: Document, names: Names, variables: dict[str, Any]) -> None:
        self.builder = Builder(doc, names, build=False)
        self.names = names
        self.variables = variables

    @property
    def problems(self) -> list[Problem]:
        return self.builder.problems

    def problem(self, message: str, path: Path) -> None:
        self.builder.problem(message, path)

    def read(self, data: Any, path: Path, nested: bool = False) -> AgentConfig | None:
        if not isinstance(data, dict):
            self.problem(f"an agent is a mapping (name, prompt, llm...), got {type(data).__name__}", path)
            return None
        for key in data:
            if key not in AGENT_KEYS:
                self.problem(f"unknown key {key!r} in an agent spec (accepted: {', '.join(AGENT_KEYS)})",
                             path + (key,))
        if not nested and data.get("tasktree") != VERSION:
            self.problem(f"`tasktree: {VERSION}` is required (the spec format version), got {data.get('tasktree')!r}",
                         path + ("tasktree",) if "tasktree" in data else path)
        name = data.get("name")
        if not isinstance(name, str) or not spec_names.NAME.fullmatch(name):
            self.problem(f"`name` must be a word (letters, digits, _ and -), got {name!r}", path + ("name",))
            name = "agent"
        prompt = data.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            self.problem("an agent needs a `prompt` (text with $names)",
                         path + ("prompt",) if "prompt" in data else path)
            prompt = ""
        system = data.get("system", "")
        if not isinstance(system, str):
            self.problem("system is text", path + ("system",))
            system = ""
        defaults = data.get("vars") or {}
        if not isinstance(defaults, dict):
            self.problem("vars maps names to default values", path + ("vars",))
            defaults = {}
        config = AgentConfig(name=name, prompt=prompt, model="", description=str(data.get("description") or ""),
                             system=system, defaults={**defaults, **self.variables})
        if "blackboard" in data:
            self.builder.read_blackboard(data["blackboard"], path + ("blackboard",))
        self.read_llm(data, path, config)
        config.tools = self.read_tools(data.get("tools") or [], path + ("tools",))
        config.max_iterations = self.limit(data, "max_iterations", path, DEFAULT_MAX_ITERATIONS)
        config.max_total_tokens = self.limit(data, "max_total_tokens", path, None)
        for hook in ("pre_hook", "post_hook"):
            if data.get(hook) is not None:
                setattr(config, hook, self.builder.function(data[hook], path + (hook,), plain_name=True))
        self.check_vars(config, data, path, nested)
        return config

    def limit(self, data: dict[str, Any], key: str, path: Path, default: int | None) -> int | None:
        value = data.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            self.problem(f"{key} is an integer >= 1, got {value!r}", path + (key,))
            return default
        return value

    def read_llm(self, data: dict[str, Any], path: Path, config: AgentConfig) -> None:
        llm = data.get("llm")
        where = path + ("llm",)
        if not isinstance(llm, dict) or not isinstance(llm.get("model"), str) or not llm["model"]:
            self.problem("an agent needs `llm: {model: <name>}`", where if "llm" in data else path)
            return
        for key in llm:
            if key not in LLM_KEYS:
                self.problem(f"unknown key {key!r} in llm (accepted: {', '.join(LLM_KEYS)})", where + (key,))
        config.model = llm["model"]
        config.call_kwargs = {k: llm[k] for k in ("temperature", "max_tokens", "extra_body") if k in llm}
        connection = llm.get("connection")
        if connection is None:
            return
        declared = data.get("connections") or {}
        if not isinstance(declared, dict):
            self.problem("connections maps names to {base_url, api_key_env}", path + ("connections",))
            declared = {}
        found, source = declared.get(connection), path + ("connections", connection)
        if isinstance(found, dict):
            if "api_key_env" in found:
                self.problem("api_key_env is accepted only in TASKTREE_LLM_CONNECTIONS (the operator's): a document "
                             "naming an environment variable could send that key to a URL it chose",
                             source + ("api_key_env",))
            elif not isinstance(found.get("api_key"), str):
                self.problem(f"connection {connection!r} in the document needs its api_key (the processes' own key is "
                             "never sent to a URL a spec names; or use a TASKTREE_LLM_CONNECTIONS entry)", source)
        if found is None:
            found, source = configured_connections().get(connection), where + ("connection",)
        if not isinstance(found, dict):
            known = sorted({*declared, *configured_connections()})
            self.problem(f"connection {connection!r} is neither in `connections:` nor in TASKTREE_LLM_CONNECTIONS "
                         f"(known: {', '.join(known) or 'none'})", where + ("connection",))
            return
        for key in found:
            if key not in CONNECTION_KEYS:
                self.problem(f"unknown key {key!r} in connection {connection!r} (accepted: "
                             f"{', '.join(CONNECTION_KEYS)})", source + (key,))
        if not isinstance(found.get("base_url"), str):
            self.problem(f"connection {connection!r} needs a base_url", source)
        config.base_url = found.get("base_url")
        config.api_key, config.api_key_env = found.get("api_key"), found.get("api_key_env")

    def read_tools(self, tools: Any, path: Path) -> list[Any]:
        if not isinstance(tools, list):
            self.problem("tools is a list of registered tool names and {agent: {...}}", path)
            return []
        found = []
        for i, item in enumerate(tools):
            if isinstance(item, dict) and set(item) == {"agent"}:
                sub = self.read(item["agent"], path + (i, "agent"), nested=True)
                found.append(sub)
            else:
                found.append(self.builder.lookup("tool", item, path + (i,), "register_tool"))
        return found

    def check_vars(self, config: AgentConfig, data: dict[str, Any], path: Path, nested: bool) -> None:
        """A $name nothing can fill is refused now (a tool agent's $names are its arguments)."""
        if nested or config.pre_hook is not None:
            return
        properties = set((self.builder.schema or {}).get("properties") or ())
        for name in config.prompt_vars():
            if name not in config.defaults and name not in properties:
                self.problem(f"${name} has no value (give it with --var {name}=..., in `vars:`, declare it in the "
                             "blackboard schema, or return it from a pre_hook)", path + ("prompt",))


def configured_connections() -> dict[str, dict[str, str]]:
    from ..core.settings import TasktreeSettings

    return dict(TasktreeSettings().llm_connections)


def check_agent(doc: Document, variables: dict[str, Any], names: Names) -> list[Problem]:
    problems = substitute(doc, variables, skip=_is_prompt)
    reader = _AgentReader(doc, names, variables)
    reader.read(doc.data, ())
    return problems + reader.problems


def build_agent(tree_class: Any, doc: Document, variables: dict[str, Any], name: str | None = None) -> Any:
    original = copy.deepcopy(doc.data)
    problems = substitute(doc, variables, skip=_is_prompt)
    reader = _AgentReader(doc, LocalNames(), variables)
    config = reader.read(doc.data, ())
    problems += reader.problems
    if problems or config is None:
        raise SpecError(problems, doc.source)
    tree = compile_agent(tree_class, config, name or config.name)
    tree.spec, tree.spec_variables = original, dict(variables)
    tree.spec_hash = spec_hash({"document": original, "variables": variables})
    tree.blackboard_schema = reader.builder.schema
    tree.agent = config
    return tree
