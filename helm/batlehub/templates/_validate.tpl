{{/*
Combinations that would render and even start, then lose or split data: fail the render with what
to change instead. Included by the Deployment, so `helm template` and `helm install` both stop.
*/}}
{{- define "batlehub.validate" -}}
{{- $v := .Values -}}
{{- if include "batlehub.multiReplica" . -}}
{{- $why := printf "replicaCount is %d" (int $v.replicaCount) -}}
{{- if $v.autoscaling.enabled -}}
{{- $why = printf "autoscaling is enabled (up to %d replicas)" (int $v.autoscaling.maxReplicas) -}}
{{- end -}}
{{- $fix := "or run one replica (replicaCount 1, autoscaling.enabled false)" -}}
{{- if eq $v.database.type "sqlite" -}}
{{- fail (printf "batlehub: %s, but database.type is \"sqlite\": SQLite is a file that one pod opens, and each pod would get a database of its own. Use database.type \"postgresql\" with database.url, %s." $why $fix) -}}
{{- end -}}
{{- if eq $v.cache.type "memory" -}}
{{- fail (printf "batlehub: %s, but cache.type is \"memory\", a cache inside each process: rate limits, IP blocks, upstream metadata and single-flight leases would not be shared between replicas. Use cache.type \"redis\" (with cache.url) or \"postgres\", %s." $why $fix) -}}
{{- end -}}
{{- if and (eq $v.storage.type "filesystem") (not (include "batlehub.sharedVolume" .)) -}}
{{- fail (printf "batlehub: %s, but storage.type is \"filesystem\" on a volume that is not shared: a package published through one pod would be missing on the others. Use storage.type \"s3\", or persistence.enabled true with persistence.accessModes [ReadWriteMany], %s." $why $fix) -}}
{{- end -}}
{{- end -}}
{{- if and (gt (int $v.server.workers) 1) (eq $v.cache.type "memory") -}}
{{- fail (printf "batlehub: server.workers is %d, but cache.type is \"memory\", a cache inside each process: the workers would not share rate limits, IP blocks and leases. Use cache.type \"redis\" or \"postgres\", or server.workers 1." (int $v.server.workers)) -}}
{{- end -}}

{{- $refs := include "batlehub.secretRefs" . | fromJson -}}
{{- $extraEnv := list -}}
{{- range $v.extraEnv -}}{{- $extraEnv = append $extraEnv .name -}}{{- end -}}
{{- if and (eq $v.database.type "postgresql") (not $refs.databaseUrl) (not (has "BATLEHUB_DATABASE__URL" $extraEnv)) -}}
{{- fail "batlehub: database.type is \"postgresql\" but there is no database URL: set database.url, or secrets.existingSecret with secrets.existingSecretKeys.databaseUrl." -}}
{{- end -}}
{{- if and (eq $v.cache.type "redis") (not $refs.cacheUrl) (not (has "BATLEHUB_CACHE__URL" $extraEnv)) -}}
{{- fail "batlehub: cache.type is \"redis\" but there is no Redis URL: set cache.url, or secrets.existingSecret with secrets.existingSecretKeys.cacheUrl." -}}
{{- end -}}
{{- if eq $v.storage.type "s3" -}}
{{- if not $v.storage.s3.bucket -}}
{{- fail "batlehub: storage.type is \"s3\" but storage.s3.bucket is empty." -}}
{{- end -}}
{{- if ne (empty $refs.s3AccessKeyId) (empty $refs.s3SecretAccessKey) -}}
{{- fail "batlehub: give both S3 keys (storage.s3.accessKeyId and storage.s3.secretAccessKey, or both secrets.existingSecretKeys.s3AccessKeyId and .s3SecretAccessKey), or neither for the default AWS credential chain." -}}
{{- end -}}
{{- end -}}

{{- $drain := add (int $v.lifecycle.preStopSleepSeconds) (int (ceil $v.server.shutdownTimeoutSecs)) -}}
{{- $grace := int $v.lifecycle.terminationGracePeriodSeconds -}}
{{- if and (gt $grace 0) (lt $grace $drain) -}}
{{- fail (printf "batlehub: lifecycle.terminationGracePeriodSeconds is %d, shorter than lifecycle.preStopSleepSeconds + server.shutdownTimeoutSecs (%d): pods would be killed while still draining requests." $grace $drain) -}}
{{- end -}}
{{- end -}}
