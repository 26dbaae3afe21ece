"""Backend-independent text handling: from a Generate frame to a prompt
(chat template, tools, what a template says about tools), the controls
applied while decoding (grammars, logit bias), and from token bytes back to
client-visible text. Both engines use it; the supervisor reads templates
with it too."""
