{{/*
A TOML writer. Helm's own toToml writes every number that came from values as a float (port =
8080.0), because values are read as JSON numbers, and BatleHub's integer settings reject floats:
here a whole number is written as an integer.

  {{ include "batlehub.toml" $map }}

Tables become [headers], lists of tables [[headers]], nulls are left out. Strings are written as
JSON strings, whose escapes are all valid in TOML basic strings.
*/}}

{{- define "batlehub.toml" -}}
{{- include "batlehub.toml.table" (dict "path" "" "table" .) | trim -}}
{{- end -}}

{{- define "batlehub.toml.table" -}}
{{- $path := .path -}}
{{- $table := .table -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $value := get $table $key -}}
{{- if not (or (kindIs "invalid" $value) (kindIs "map" $value) (include "batlehub.toml.isTableList" $value)) }}
{{ include "batlehub.toml.key" $key }} = {{ include "batlehub.toml.value" $value }}
{{- end -}}
{{- end -}}
{{- range $key := keys $table | sortAlpha -}}
{{- $value := get $table $key -}}
{{- $name := include "batlehub.toml.key" $key -}}
{{- $sub := $name -}}
{{- if $path -}}{{- $sub = printf "%s.%s" $path $name -}}{{- end -}}
{{- if kindIs "map" $value }}

[{{ $sub }}]
{{- include "batlehub.toml.table" (dict "path" $sub "table" $value) -}}
{{- else if include "batlehub.toml.isTableList" $value -}}
{{- range $item := $value }}

[[{{ $sub }}]]
{{- include "batlehub.toml.table" (dict "path" $sub "table" $item) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* "true" for a non-empty list whose items are all tables. */}}
{{- define "batlehub.toml.isTableList" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) -}}
{{- $all := true -}}
{{- range . -}}{{- if not (kindIs "map" .) -}}{{- $all = false -}}{{- end -}}{{- end -}}
{{- if $all -}}true{{- end -}}
{{- end -}}
{{- end -}}

{{- define "batlehub.toml.key" -}}
{{- if regexMatch "^[A-Za-z0-9_-]+$" . -}}{{ . }}{{- else -}}{{ toJson . }}{{- end -}}
{{- end -}}

{{- define "batlehub.toml.value" -}}
{{- if kindIs "string" . -}}
{{- toJson . -}}
{{- else if kindIs "bool" . -}}
{{- . -}}
{{- else if kindIs "float64" . -}}
{{- if eq . (floor .) -}}{{- int64 . -}}{{- else -}}{{- . -}}{{- end -}}
{{- else if or (kindIs "int" .) (kindIs "int64" .) -}}
{{- . -}}
{{- else if kindIs "slice" . -}}
[{{- range $i, $item := . -}}{{- if $i -}}, {{ end -}}{{- include "batlehub.toml.value" $item -}}{{- end -}}]
{{- else if kindIs "map" . -}}
{{- $table := . -}}
{ {{- range $i, $key := keys $table | sortAlpha -}}{{- if $i -}}, {{ end -}}{{- include "batlehub.toml.key" $key }} = {{ include "batlehub.toml.value" (get $table $key) -}}{{- end -}} }
{{- else -}}
{{- fail (printf "batlehub: %v (a %s) cannot be written as TOML" . (kindOf .)) -}}
{{- end -}}
{{- end -}}
