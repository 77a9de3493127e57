{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "dualpath-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the prefix of every object the chart creates. */}}
{{- define "dualpath-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels that select the operator pod; never change them on upgrade (selectors are immutable). */}}
{{- define "dualpath-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "dualpath-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/* Labels on every object. */}}
{{- define "dualpath-operator.labels" -}}
{{ include "dualpath-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: dualpath
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* metadata.annotations of every object, or nothing. */}}
{{- define "dualpath-operator.annotations" -}}
{{- with .Values.commonAnnotations -}}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "dualpath-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "dualpath-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Image reference; the tag defaults to the chart's appVersion. */}}
{{- define "dualpath-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
RBAC rules on namespaced resources, shared by the ClusterRole (all namespaces) and the per-namespace Roles.
Exactly what the operator uses (docs/design/0001-timers-vs-finalizers.md): it watches and indexes its
DualPathClusters and their children, server-side-applies children (patch, plus create for new objects),
deletes only children it owns, and writes the status subresource. No update verbs (server-side apply is a
PATCH), no wildcards.
*/}}
{{- define "dualpath-operator.namespacedRules" -}}
# DualPathClusters: read only. The operator never writes a DualPathCluster's spec or metadata (GitOps rule;
# no finalizer or Kopf annotations, docs/design/0001), and RBAC enforces it: no patch/update here.
- apiGroups: ["dualpath.io"]
  resources: ["dualpathclusters"]
  verbs: ["get", "list", "watch"]
# Status is computed whole by every reconcile and written through the status subresource.
- apiGroups: ["dualpath.io"]
  resources: ["dualpathclusters/status"]
  verbs: ["get", "patch"]
# ownerReferences with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement is enabled.
- apiGroups: ["dualpath.io"]
  resources: ["dualpathclusters/finalizers"]
  verbs: ["update"]
# Engine pods (one per engine group and role): created, replaced and drained-then-deleted by the operator.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Scheduler Service and engine ConfigMap.
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# The scheduler's admin-token Secret, one per DualPathCluster. RBAC cannot restrict by owner, and the names
# are per cluster, so resourceNames cannot either: the verbs are minimal instead. No list/watch (the
# operator never caches or reads other Secrets in bulk), no delete (the garbage collector removes the
# Secret with its owner). `get` reads its own token by name to call the scheduler's admin API.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "create", "patch"]
# Events on transitions (Kopf and the operator post core/v1 Events).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
# The scheduler Deployment.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# PodDisruptionBudget of the engine pods.
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# NetworkPolicy restricting the engine ports.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
{{- end }}
