{{/* Names, labels and the small facts several templates need. */}}

{{- define "batlehub.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "batlehub.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "batlehub.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "batlehub.selectorLabels" -}}
app.kubernetes.io/name: {{ include "batlehub.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "batlehub.labels" -}}
helm.sh/chart: {{ include "batlehub.chart" . }}
{{ include "batlehub.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "batlehub.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "batlehub.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "batlehub.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The pod's paths; the image's BATLEHUB_DATA_DIR is the same folder. */}}
{{- define "batlehub.dataDir" -}}/var/lib/batlehub{{- end -}}
{{- define "batlehub.configDir" -}}/etc/batlehub{{- end -}}

{{/* "true" when more than one BatleHub process may share the backends at once. */}}
{{- define "batlehub.multiReplica" -}}
{{- if or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1) -}}true{{- end -}}
{{- end -}}

{{/* "true" when the data volume can be mounted by pods on several nodes. */}}
{{- define "batlehub.sharedVolume" -}}
{{- if and .Values.persistence.enabled (has "ReadWriteMany" .Values.persistence.accessModes) -}}true{{- end -}}
{{- end -}}

{{/* The least number of replicas that run: what a PodDisruptionBudget can protect. */}}
{{- define "batlehub.minReplicas" -}}
{{- if .Values.autoscaling.enabled -}}{{ int .Values.autoscaling.minReplicas }}{{- else -}}{{ int .Values.replicaCount }}{{- end -}}
{{- end -}}

{{- define "batlehub.terminationGracePeriodSeconds" -}}
{{- $needed := add (int .Values.lifecycle.preStopSleepSeconds) (int (ceil .Values.server.shutdownTimeoutSecs)) -}}
{{- $given := int .Values.lifecycle.terminationGracePeriodSeconds -}}
{{- if eq $given 0 -}}{{ add $needed 5 }}{{- else -}}{{ $given }}{{- end -}}
{{- end -}}

{{/*
The base URL links are built with: server.publicUrl, else the first ingress host (https when a
TLS entry names it). Without it, and without trustedProxies, a pod behind a TLS ingress would
see plain http requests and hand npm http:// tarball URLs.
*/}}
{{- define "batlehub.publicUrl" -}}
{{- if .Values.server.publicUrl -}}
{{- .Values.server.publicUrl -}}
{{- else if and .Values.ingress.enabled .Values.ingress.hosts -}}
{{- $host := (first .Values.ingress.hosts).host -}}
{{- $scheme := "http" -}}
{{- range .Values.ingress.tls -}}
{{- if has $host (.hosts | default list) -}}{{- $scheme = "https" -}}{{- end -}}
{{- end -}}
{{- printf "%s://%s" $scheme $host -}}
{{- end -}}
{{- end -}}
