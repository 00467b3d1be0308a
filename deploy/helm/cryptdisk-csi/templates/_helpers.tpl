{{/* Names and labels shared by every object. */}}

{{- define "cryptdisk.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The backend, checked once: every template that branches on it calls this. */}}
{{- define "cryptdisk.cloud" -}}
{{- $cloud := required "set cloud to azure, gcp or local (--set cloud=azure)" .Values.cloud -}}
{{- if not (has $cloud (list "azure" "gcp" "local")) -}}
{{- fail (printf "cloud must be azure, gcp or local, not %q" $cloud) -}}
{{- end -}}
{{- $cloud -}}
{{- end -}}

{{- define "cryptdisk.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "cryptdisk.labels" -}}
{{ include "cryptdisk.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "cryptdisk.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/*
The master secret: always the user's own Secret. Rendering it here would put
the bytes every volume key derives from into Helm's release record.
*/}}
{{- define "cryptdisk.masterSecretName" -}}
{{- required (printf "set kms.existingSecret to the name of a Secret in %s with the keys master.key and salt (32 random bytes each; see values.yaml). The chart does not make one, since Helm would keep it in its release record; an install from an earlier chart version made %s-master-secret: name that" .Release.Namespace (include "cryptdisk.fullname" .)) .Values.kms.existingSecret -}}
{{- end -}}
{{/* The node plugin's ServiceAccount: the only one whose tokens the KMS accepts. */}}
{{- define "cryptdisk.nodeServiceAccount" -}}{{ include "cryptdisk.fullname" . }}-node{{- end -}}
{{/* Where the node plugin reads its projected token for the KMS. */}}
{{- define "cryptdisk.kmsTokenDir" -}}/var/run/secrets/cryptdisk-kms{{- end -}}
{{/* Names of the Secrets the KMS and the node plugins read. */}}
{{- define "cryptdisk.kmsTLSSecret" -}}{{ include "cryptdisk.fullname" . }}-kms-tls{{- end -}}
{{- define "cryptdisk.nodeTLSSecret" -}}{{ include "cryptdisk.fullname" . }}-node-tls{{- end -}}
{{- define "cryptdisk.kmsService" -}}{{ include "cryptdisk.fullname" . }}-kms{{- end -}}
{{- define "cryptdisk.kmsURL" -}}
https://{{ include "cryptdisk.kmsService" . }}.{{ .Release.Namespace }}.svc:{{ .Values.kms.port }}
{{- end -}}

{{/* The socket every CSI container of a pod shares. */}}
{{- define "cryptdisk.socketDir" -}}/csi{{- end -}}

{{/* A container that keeps no root privileges. */}}
{{- define "cryptdisk.restrictedContainer" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
{{- end -}}

{{/*
Root without capabilities: for containers that must read or create root-owned
files on the host (the registration socket) or in a Secret volume with mode 0400
(the KMS: the driver refuses a secret file that anyone but its owner can read,
and kubelet's fsGroup would make it group-readable).
*/}}
{{- define "cryptdisk.rootNoCaps" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsUser: 0
runAsNonRoot: false
capabilities:
  drop: [ALL]
{{- end -}}

{{/* Sidecar arguments every leader-electing controller sidecar takes. */}}
{{- define "cryptdisk.sidecarArgs" -}}
- --csi-address=$(ADDRESS)
- --v=2
- --leader-election
- --leader-election-namespace=$(NAMESPACE)
{{- end -}}

{{- define "cryptdisk.sidecarEnv" -}}
- name: ADDRESS
  value: {{ include "cryptdisk.socketDir" . }}/csi.sock
- name: NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
{{- end -}}

{{/* The probe a leader-electing sidecar serves on its --http-endpoint (the port). */}}
{{- define "cryptdisk.sidecarProbe" -}}
livenessProbe:
  httpGet:
    path: /healthz/leader-election
    port: {{ . }}
  initialDelaySeconds: 10
  periodSeconds: 20
  timeoutSeconds: 10
  failureThreshold: 3
{{- end -}}
