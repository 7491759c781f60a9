{{/* Names and labels. */}}
{{- define "switchyard.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}{{ .Release.Name | trunc 40 | trimSuffix "-" }}{{- else -}}{{ printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" }}{{- end -}}
{{- end -}}

{{- define "switchyard.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "switchyard.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "switchyard.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* etcd client URLs, comma-separated. */}}
{{- define "switchyard.etcd" -}}
{{- if .Values.etcd.enabled -}}
{{ if eq .Values.tls.mode "off" }}http{{ else }}https{{ end }}://{{ include "switchyard.fullname" . }}-etcd:2379
{{- else -}}
{{ join "," .Values.etcd.external.endpoints }}
{{- end -}}
{{- end -}}

{{/* The worker role of attention pods: separate pools in AFD, both roles in one pod otherwise. */}}
{{- define "switchyard.attentionRole" -}}
{{- if eq .Values.cluster.layout "afd" }}attention{{ else }}both{{ end -}}
{{- end -}}

{{/* --model as every container sees it. */}}
{{- define "switchyard.modelArg" -}}
{{- if eq .Values.model.source "pvc" -}}
{{ .Values.model.mountPath }}/{{ .Values.model.name }}
{{- else -}}
{{ .Values.model.name }}
{{- end -}}
{{- end -}}

{{/* Environment shared by every Switchyard container (each binary reads the SWITCHYARD_* it knows). */}}
{{- define "switchyard.env" -}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: HF_HOME
  value: {{ .Values.model.mountPath }}/hf
{{- if .Values.model.download.hfTokenSecret }}
- name: HF_TOKEN
  valueFrom: {secretKeyRef: {name: {{ .Values.model.download.hfTokenSecret }}, key: token}}
{{- end }}
{{- if and (not .Values.etcd.enabled) .Values.etcd.external.passwordSecret }}
- name: SWITCHYARD_ETCD_PASSWORD
  valueFrom: {secretKeyRef: {name: {{ .Values.etcd.external.passwordSecret }}, key: password}}
{{- end }}
{{- end -}}

{{/* Internal mTLS: the Secret with a role's certificate (tls.mode certManager or secrets), its volume and
     mount. Pass (dict "root" $ "role" "router"). */}}
{{- define "switchyard.tlsSecret" -}}
{{ include "switchyard.fullname" .root }}-tls-{{ .role }}
{{- end -}}

{{- define "switchyard.tlsVolume" -}}
{{- if ne .root.Values.tls.mode "off" }}
- name: tls
  secret: {secretName: {{ include "switchyard.tlsSecret" . }}, defaultMode: 0440}
{{- end }}
{{- end -}}

{{- define "switchyard.tlsMount" -}}
{{- if ne .Values.tls.mode "off" }}
- {name: tls, mountPath: /etc/switchyard/tls, readOnly: true}
{{- end }}
{{- end -}}

{{/* The weights volume and its mount. */}}
{{- define "switchyard.modelVolume" -}}
- name: model
{{- if eq .Values.model.source "pvc" }}
  persistentVolumeClaim: {claimName: {{ required "model.pvc.claimName is required with model.source=pvc" .Values.model.pvc.claimName }}, readOnly: true}
{{- else }}
  emptyDir: {sizeLimit: {{ .Values.model.download.cacheSize }}}
{{- end }}
{{- end -}}

{{- define "switchyard.modelMount" -}}
- name: model
  mountPath: {{ .Values.model.mountPath }}
{{- end -}}

{{/* The init container that downloads the weights (model.source=download). */}}
{{- define "switchyard.downloadInit" -}}
{{- if eq .Values.model.source "download" }}
initContainers:
  - name: download-model
    image: {{ include "switchyard.image" . }}
    imagePullPolicy: {{ .Values.image.pullPolicy }}
    command: ["switchyard"]
    args: ["download", "--model", {{ include "switchyard.modelArg" . | quote }}]
    env:
      {{- include "switchyard.env" . | nindent 6 }}
    volumeMounts:
      {{- include "switchyard.modelMount" . | nindent 6 }}
{{- end }}
{{- end -}}

{{/* Pod-level security shared by every pod: the image's non-root user. */}}
{{- define "switchyard.podSecurity" -}}
securityContext:
  runAsNonRoot: true
  runAsUser: 10001
  fsGroup: 10001
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "switchyard.containerSecurity" -}}
securityContext:
  allowPrivilegeEscalation: false
  capabilities: {drop: ["ALL"]}
{{- end -}}

{{- define "switchyard.preStop" -}}
lifecycle:
  preStop:
    exec: {command: ["sleep", "{{ .Values.preStopSleepSeconds }}"]}
{{- end -}}
