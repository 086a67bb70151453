{{/*
BatleHub's configuration, built from the values as a map (JSON text: include it and fromJson).
Secrets are not in it: they reach the pod as BATLEHUB_<SECTION>__<KEY> variables from a Secret
(batlehub.env), which BatleHub merges over the file.
*/}}
{{- define "batlehub.config" -}}
{{- $v := .Values -}}
{{- $server := dict "host" "0.0.0.0" "port" $v.server.port "shutdown_timeout_secs" $v.server.shutdownTimeoutSecs "workers" $v.server.workers -}}
{{- with $v.server.trustedProxies -}}{{- $_ := set $server "trusted_proxies" . -}}{{- end -}}
{{- with include "batlehub.publicUrl" . -}}{{- $_ := set $server "public_url" . -}}{{- end -}}

{{- $database := dict "type" $v.database.type -}}
{{- if eq $v.database.type "postgresql" -}}{{- $_ := set $database "max_connections" $v.database.maxConnections -}}{{- end -}}

{{- $cache := dict "type" $v.cache.type -}}
{{- if and (eq $v.cache.type "redis") $v.cache.prefix -}}{{- $_ := set $cache "prefix" $v.cache.prefix -}}{{- end -}}

{{- $storage := dict "type" $v.storage.type -}}
{{- if eq $v.storage.type "s3" -}}
{{- $s3 := $v.storage.s3 -}}
{{- $_ := set $storage "bucket" $s3.bucket -}}
{{- $_ := set $storage "force_path_style" $s3.forcePathStyle -}}
{{- $_ := set $storage "redirect_downloads" $s3.redirectDownloads -}}
{{- with $s3.region -}}{{- $_ := set $storage "region" . -}}{{- end -}}
{{- with $s3.endpoint -}}{{- $_ := set $storage "endpoint" . -}}{{- end -}}
{{- with $s3.prefix -}}{{- $_ := set $storage "prefix" . -}}{{- end -}}
{{- end -}}

{{- $metrics := dict "enabled" $v.metrics.enabled "require_token" $v.metrics.requireToken "port" $v.metrics.port -}}
{{- $config := dict "server" $server "database" $database "cache" $cache "storage" $storage "registries" $v.registries "metrics" $metrics -}}
{{- if $v.otel.endpoint -}}
{{- $_ := set $config "otel" (dict "endpoint" $v.otel.endpoint "service_name" $v.otel.serviceName) -}}
{{- end -}}

{{- /* extraConfig adds what the chart does not write; overriding a key the values set would leave two places that seem to decide it. */ -}}
{{- range $section, $table := $v.extraConfig -}}
{{- $secret := include "batlehub.secretSetting" (dict "section" $section "table" $table) -}}
{{- if $secret -}}
{{- fail (printf "batlehub: extraConfig.%s would put a secret into the ConfigMap; %s" $section $secret) -}}
{{- end -}}
{{- if not (hasKey $config $section) -}}
{{- $_ := set $config $section $table -}}
{{- else if and (kindIs "map" $table) (kindIs "map" (get $config $section)) -}}
{{- $ours := get $config $section -}}
{{- range $key, $value := $table -}}
{{- if hasKey $ours $key -}}
{{- fail (printf "batlehub: extraConfig.%s.%s is written by the chart from its own values; set it there (helm/README.md lists them)" $section $key) -}}
{{- end -}}
{{- $_ := set $ours $key $value -}}
{{- end -}}
{{- else -}}
{{- fail (printf "batlehub: extraConfig.%s replaces what the chart writes from its own values; set it there (helm/README.md lists them)" $section) -}}
{{- end -}}
{{- end -}}
{{- toJson $config -}}
{{- end -}}

{{/* Why an extraConfig section may not be set, when it holds a secret; else empty. */}}
{{- define "batlehub.secretSetting" -}}
{{- $table := .table -}}
{{- if eq .section "auth" -}}
give tokens as auth.tokens, which keeps them in a Secret
{{- else if and (eq .section "database") (kindIs "map" $table) (hasKey $table "url") -}}
set database.url (kept in the Secret) or secrets.existingSecret
{{- else if and (eq .section "cache") (kindIs "map" $table) (hasKey $table "url") -}}
set cache.url (kept in the Secret) or secrets.existingSecret
{{- else if and (eq .section "storage") (kindIs "map" $table) (or (hasKey $table "access_key_id") (hasKey $table "secret_access_key")) -}}
set storage.s3.accessKeyId and storage.s3.secretAccessKey (kept in the Secret) or secrets.existingSecret
{{- end -}}
{{- end -}}

{{/*
Where each secret setting comes from: {"name": Secret, "key": key}, or {} when it is not set.
With secrets.existingSecret everything comes from that Secret; otherwise from the chart's.
*/}}
{{- define "batlehub.secretRefs" -}}
{{- $v := .Values -}}
{{- $own := include "batlehub.fullname" . -}}
{{- $refs := dict -}}
{{- $fromValues := dict "databaseUrl" $v.database.url "cacheUrl" $v.cache.url "s3AccessKeyId" $v.storage.s3.accessKeyId "s3SecretAccessKey" $v.storage.s3.secretAccessKey -}}
{{- $chartKeys := dict "databaseUrl" "database-url" "cacheUrl" "cache-url" "s3AccessKeyId" "s3-access-key-id" "s3SecretAccessKey" "s3-secret-access-key" -}}
{{- range $setting, $value := $fromValues -}}
{{- if $v.secrets.existingSecret -}}
{{- if $value -}}
{{- fail (printf "batlehub: %s is set in the values while secrets.existingSecret is %q; put it in that Secret and name its key in secrets.existingSecretKeys.%s" (include "batlehub.valuePath" $setting) $v.secrets.existingSecret $setting) -}}
{{- end -}}
{{- with get $v.secrets.existingSecretKeys $setting -}}
{{- $_ := set $refs $setting (dict "name" $v.secrets.existingSecret "key" .) -}}
{{- end -}}
{{- else if $value -}}
{{- $_ := set $refs $setting (dict "name" $own "key" (get $chartKeys $setting) "value" $value) -}}
{{- end -}}
{{- end -}}
{{- $tokens := list -}}
{{- range $i, $token := $v.auth.tokens -}}
{{- $ref := dict -}}
{{- if and $token.value $token.secretKey -}}
{{- fail (printf "batlehub: auth.tokens[%d] has both value and secretKey; give one" $i) -}}
{{- else if $token.secretKey -}}
{{- if not $v.secrets.existingSecret -}}
{{- fail (printf "batlehub: auth.tokens[%d].secretKey needs secrets.existingSecret, the Secret that holds it" $i) -}}
{{- end -}}
{{- $ref = dict "name" $v.secrets.existingSecret "key" $token.secretKey -}}
{{- else if hasPrefix "sha256:" ($token.value | default "") -}}
{{- /* A hash is not a secret: it goes into the variable as it is. */ -}}
{{- else if $token.value -}}
{{- if $v.secrets.existingSecret -}}
{{- fail (printf "batlehub: auth.tokens[%d].value is a plaintext token while secrets.existingSecret is %q; put it in that Secret and give its key as secretKey, or give sha256:<hex> of it" $i $v.secrets.existingSecret) -}}
{{- end -}}
{{- $ref = dict "name" $own "key" (printf "auth-token-%d" $i) "value" $token.value -}}
{{- else -}}
{{- fail (printf "batlehub: auth.tokens[%d] needs value (the token, or sha256:<hex> of it) or secretKey" $i) -}}
{{- end -}}
{{- $tokens = append $tokens $ref -}}
{{- end -}}
{{- $_ := set $refs "tokens" $tokens -}}
{{- toJson $refs -}}
{{- end -}}

{{- define "batlehub.valuePath" -}}
{{- get (dict "databaseUrl" "database.url" "cacheUrl" "cache.url" "s3AccessKeyId" "storage.s3.accessKeyId" "s3SecretAccessKey" "storage.s3.secretAccessKey") . -}}
{{- end -}}

{{/* The data the chart's own Secret holds (empty with secrets.existingSecret). */}}
{{- define "batlehub.secretData" -}}
{{- $refs := include "batlehub.secretRefs" . | fromJson -}}
{{- $data := dict -}}
{{- range $setting, $ref := omit $refs "tokens" -}}
{{- if hasKey $ref "value" -}}{{- $_ := set $data $ref.key $ref.value -}}{{- end -}}
{{- end -}}
{{- range $refs.tokens -}}
{{- if hasKey . "value" -}}{{- $_ := set $data .key .value -}}{{- end -}}
{{- end -}}
{{- toJson $data -}}
{{- end -}}

{{/*
The container's environment. Settings from a Secret are BATLEHUB_<SECTION>__<KEY> variables.
The tokens are one BATLEHUB_AUTH variable holding the [[auth]] list as TOML, with each secret
token put in by Kubernetes' $(VAR) expansion from a variable defined before it; those carry no
BATLEHUB_ prefix, which BatleHub would read as settings of their own.
*/}}
{{- define "batlehub.env" -}}
{{- $v := .Values -}}
{{- $refs := include "batlehub.secretRefs" . | fromJson -}}
- name: BATLEHUB_CONFIG
  value: {{ include "batlehub.configDir" . }}/batlehub.toml
- name: BATLEHUB_DATA_DIR
  value: {{ include "batlehub.dataDir" . }}
{{- if and (eq $v.database.type "postgresql") $refs.databaseUrl }}
- name: BATLEHUB_DATABASE__URL
  valueFrom:
    secretKeyRef:
      name: {{ $refs.databaseUrl.name }}
      key: {{ $refs.databaseUrl.key }}
{{- end }}
{{- if and (has $v.cache.type (list "redis" "postgres")) $refs.cacheUrl }}
- name: BATLEHUB_CACHE__URL
  valueFrom:
    secretKeyRef:
      name: {{ $refs.cacheUrl.name }}
      key: {{ $refs.cacheUrl.key }}
{{- end }}
{{- /* S3 keys through the AWS credential chain's own variables: no TOML quoting for a key that looks like a number. */ -}}
{{- if eq $v.storage.type "s3" }}
{{- with $refs.s3AccessKeyId }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- with $refs.s3SecretAccessKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- if $v.auth.tokens }}
{{- $entries := list -}}
{{- range $i, $token := $v.auth.tokens }}
{{- $ref := index $refs.tokens $i }}
{{- $value := $token.value }}
{{- if $ref }}
- name: AUTH_TOKEN_{{ $i }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- $value = printf "$(AUTH_TOKEN_%d)" $i }}
{{- end }}
{{- /* A TOML literal string: a token with backslashes or double quotes stays as it is. */ -}}
{{- $entries = append $entries (printf "{user_id = %s, role = %s, value = '%s'}" (toJson $token.user_id) (toJson ($token.role | default "user")) $value) }}
{{- end }}
- name: BATLEHUB_AUTH
  value: {{ printf "[{type = \"token\", tokens = [%s]}]" (join ", " $entries) | quote }}
{{- end }}
{{- with $v.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end -}}
